"""transformers' MusicgenMelodyForConditionalGeneration as the reference for fastgen's melody tests: greedy codes of
one request (a padded transformers batch lets short prompts attend to text padding, so requests are compared one
at a time), and melodies to condition on."""
from __future__ import annotations

import numpy as np
import torch

MELODY_RATE = 32_000


def melodies() -> dict[str, np.ndarray]:
    """Two melodies: 2 s mono (16 chroma frames: tiled to the tiny model's 40) and 7 s stereo (55 frames: cut)."""
    rng = np.random.default_rng(11)
    t = np.arange(2 * MELODY_RATE) / MELODY_RATE
    short = (0.4 * np.sin(2 * np.pi * 330.0 * t * (1 + t)) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
    long = (0.3 * rng.standard_normal((2, 7 * MELODY_RATE))).astype(np.float32)
    return {"short": short, "long": long}


def reference_codes(reference, tokenizer, prompt: str | None, chroma: torch.Tensor | None, guidance: float,
                    max_new_tokens: int, decoder_input_ids: np.ndarray | None = None) -> np.ndarray:
    """transformers' greedy codes [K, frames] for one request (captured where they enter EnCodec). ``prompt``
    None: MusicgenMelodyProcessor.get_unconditional_inputs' text (T5 of "" with its mask zeroed). ``chroma``
    [frames, 12] one-hot (None: transformers' null chroma)."""
    inputs = tokenizer([prompt if prompt is not None else ""], return_tensors="pt")
    if prompt is None:
        inputs["attention_mask"][:] = 0
    extra = {} if chroma is None else {"input_features": chroma[None]}
    if decoder_input_ids is not None:
        extra["decoder_input_ids"] = torch.from_numpy(decoder_input_ids)
    captured = []
    original = reference.audio_encoder.decode

    def spy(audio_codes, *args, **kw):
        captured.append(audio_codes[0, 0].clone())
        return original(audio_codes, *args, **kw)

    reference.audio_encoder.decode = spy
    try:
        with torch.no_grad():
            reference.generate(**inputs, **extra, do_sample=False, guidance_scale=guidance,
                               max_new_tokens=max_new_tokens)
    finally:
        reference.audio_encoder.decode = original
    if len(captured) == 1:
        return captured[0].numpy()
    return torch.stack(captured, dim=1).flatten(0, 1).numpy()  # stereo: l0 r0 l1 r1 …
