"""Greedy decoding must match transformers' MusicgenForConditionalGeneration.generate token for token, and the audio
within float tolerance: text batches with padding, guidance 1 and 3, unconditional, audio prompts, mono and stereo."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastgen

PROMPTS = ["80s pop track with bassy drums", "lofi beat", "a slow blues"]
STEPS = 24
AUDIO_TOL = 1e-4


@pytest.fixture(scope="module")
def models(tiny_mono_dir, tiny_stereo_dir):
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration
    loaded = {}
    for name, folder in (("mono", tiny_mono_dir), ("stereo", tiny_stereo_dir)):
        reference = MusicgenForConditionalGeneration.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ours = fastgen.MusicGen.from_pretrained(folder, max_slots=4, backend="torch", dtype=torch.float32)
        loaded[name] = (reference, tokenizer, ours)
    return loaded


def reference_generate(reference, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """transformers' codes [B, K, frames] (captured where they enter EnCodec) and audio [B, C, samples]."""
    captured = []
    original = reference.audio_encoder.decode

    def spy(audio_codes, *args, **kw):
        captured.append(audio_codes[0].clone())
        return original(audio_codes, *args, **kw)

    reference.audio_encoder.decode = spy
    try:
        with torch.no_grad():
            audio = reference.generate(do_sample=False, max_new_tokens=STEPS, **kwargs)
    finally:
        reference.audio_encoder.decode = original
    if len(captured) == 1:
        codes = captured[0]
    else:  # stereo: left and right decoded separately; MusicGen interleaves them l0 r0 l1 r1 …
        left, right = captured
        codes = torch.stack([left, right], dim=2).flatten(1, 2)
    return codes.numpy(), audio.numpy()


def assert_same(outputs, codes, audio):
    assert len(outputs) == codes.shape[0]
    for i, out in enumerate(outputs):
        np.testing.assert_array_equal(out.codes, codes[i], err_msg=f"codes of item {i} differ")
        assert out.audio.shape == audio[i].shape
        np.testing.assert_allclose(out.audio, audio[i], atol=AUDIO_TOL, rtol=0, err_msg=f"audio of item {i}")
        assert out.sample_rate == 32000


@pytest.mark.parametrize("layout", ["mono", "stereo"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_text_batch_matches_transformers(models, layout, guidance):
    reference, tokenizer, ours = models[layout]
    inputs = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert inputs.attention_mask.min() == 0, "the batch must exercise text padding"
    codes, audio = reference_generate(reference, **inputs, guidance_scale=guidance)
    params = fastgen.SamplingParams(max_new_tokens=STEPS, do_sample=False, guidance_scale=guidance)
    assert_same(ours.generate(PROMPTS, params), codes, audio)


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_unconditional_matches_transformers(models, layout):
    reference, _, ours = models[layout]
    inputs = reference.get_unconditional_inputs(num_samples=2)
    codes, audio = reference_generate(reference, **inputs)
    params = fastgen.SamplingParams(max_new_tokens=STEPS, do_sample=False, guidance_scale=1.0)
    assert_same(ours.generate([None, None], params), codes, audio)


@pytest.mark.parametrize("layout", ["mono", "stereo"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_audio_prompt_matches_transformers(models, layout, guidance):
    reference, tokenizer, ours = models[layout]
    channels = 2 if layout == "stereo" else 1
    rng = np.random.default_rng(7)
    waveform = (0.3 * rng.standard_normal((channels, 640 * 9))).astype(np.float32)
    inputs = tokenizer(["jazzy continuation"], return_tensors="pt")
    codes, audio = reference_generate(reference, **inputs, input_values=torch.from_numpy(waveform)[None],
                                      guidance_scale=guidance)
    params = fastgen.SamplingParams(max_new_tokens=STEPS, do_sample=False, guidance_scale=guidance)
    outputs = ours.generate(["jazzy continuation"], params, audio_prompts=[(waveform, 32000)])
    assert outputs[0].prompt_frames == 9
    assert_same(outputs, codes, audio)


def test_batched_audio_prompts_do_not_condition_on_padding(models):
    """Each prompt's continuation equals its continuation alone (transformers pads the shorter prompt; we don't)."""
    _, _, ours = models["mono"]
    rng = np.random.default_rng(3)
    short = (0.3 * rng.standard_normal(640 * 5)).astype(np.float32)
    long = (0.3 * rng.standard_normal(640 * 11)).astype(np.float32)
    params = fastgen.SamplingParams(max_new_tokens=STEPS, do_sample=False, guidance_scale=3.0)
    together = ours.generate(["a", "b"], params, audio_prompts=[(short, 32000), (long, 32000)])
    alone = ours.generate(["a"], params, audio_prompts=[(short, 32000)])
    np.testing.assert_array_equal(together[0].codes, alone[0].codes)
    assert together[0].codes.shape[1] == 5 + STEPS + 1 - 4
    assert together[1].codes.shape[1] == 11 + STEPS + 1 - 4
