"""The user-facing entry point: ``fastgen.MusicGen.from_pretrained(...).generate(prompts, params)``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fastgen.audio import prepare_audio_prompt
from fastgen.config import EngineConfig
from fastgen.engine import longform
from fastgen.engine.engine import Engine
from fastgen.engine.request import GenerationOutput, RequestStatus
from fastgen.errors import RequestError, RequestFailed
from fastgen.model.musicgen import MusicgenModel
from fastgen.sampling_params import SamplingParams


class MusicGen:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, allow_pickle: bool = False,
                        **engine_options: Any) -> "MusicGen":
        """Load a MusicGen checkpoint folder (config.json, safetensors weights, tokenizer, generation_config.json)
        or a hub id. ``engine_options`` are EngineConfig fields (max_slots, backend, max_duration_s, …)."""
        model = MusicgenModel.load(name_or_path, device=device, dtype=dtype, allow_pickle=allow_pickle)
        return cls(Engine(model, EngineConfig(**engine_options)))

    @property
    def sample_rate(self) -> int:
        return self.engine.sample_rate

    @property
    def defaults(self) -> SamplingParams:
        return self.engine.model.defaults

    def generate(self, prompts: Sequence[str | None], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 audio_prompts: Sequence[tuple[Any, int] | None] | None = None,
                 progress: bool = False, codes_prompts: Sequence[Any] | None = None) -> list[GenerationOutput]:
        """Generate one output per prompt (None = unconditional), in order. ``codes_prompts`` (one int64
        [num_codebooks, frames] array per prompt, or None) continue from codes as ``audio_prompts`` do from audio.
        Raises RequestError for invalid input before any work starts, and RequestFailed if a request fails while
        running (after the others finish)."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise RequestError("prompts must be a list of strings or None, e.g. ['lofi beat']")
        n = len(prompts)
        per_prompt = _broadcast(params, n, "params")
        if isinstance(audio_prompts, tuple) and len(audio_prompts) == 2 and isinstance(audio_prompts[1], int):
            audio_prompts = [audio_prompts] * n  # one (waveform, sample_rate) continued by every prompt
        audio = _broadcast(audio_prompts, n, "audio_prompts") if audio_prompts is not None else [None] * n
        if isinstance(codes_prompts, (np.ndarray, torch.Tensor)):
            codes_prompts = [codes_prompts] * n  # one codes prompt continued by every prompt
        codes = _broadcast(codes_prompts, n, "codes_prompts") if codes_prompts is not None else [None] * n
        requests = [self.engine.make_request(p, sp, a, name=f"prompts[{i}]", codes_prompt=c)
                    for i, (p, sp, a, c) in enumerate(zip(prompts, per_prompt, audio, codes))]
        bar = None
        if progress:
            from tqdm import tqdm  # the well-kept progress bar
            bar = tqdm(total=n, unit="clip", desc="generating")
        try:
            self.engine.run(requests, progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        failures = [r for r in requests if r.status != RequestStatus.FINISHED]
        if failures:
            detail = "; ".join(f"prompts[{requests.index(r)}]: {r.error}" for r in failures[:3])
            raise RequestFailed(f"{len(failures)} of {n} request(s) failed: {detail}")
        return [r.output for r in requests]

    def decode_codes(self, codes: Any) -> np.ndarray:
        """EnCodec: codes int [num_codebooks, frames] (GenerationOutput.codes' layout) → float32 audio
        [channels, frames · hop] at ``sample_rate``."""
        dec = self.engine.model.config.decoder
        checked = longform.as_codes(codes, dec.num_codebooks, dec.vocab_size, "codes")
        return self.engine.runner.decode_audio([checked])[0]

    def encode_audio(self, waveform: Any, sample_rate: int) -> np.ndarray:
        """EnCodec: audio (numpy or torch, [samples] or [channels, samples], any rate; resampled and up/down-mixed as
        an audio prompt is) → int64 codes [num_codebooks, frames], what ``codes_prompts`` and ``decode_codes`` take."""
        dec = self.engine.model.config.decoder
        try:
            audio = prepare_audio_prompt(waveform, sample_rate, target_sample_rate=self.sample_rate,
                                         channels=dec.audio_channels, name="waveform")
        except (ValueError, TypeError) as exc:
            raise RequestError(str(exc)) from None
        return self.engine.model.codec.encode(audio).numpy().astype(np.int64)


def _broadcast(value: Any, n: int, name: str) -> list[Any]:
    if value is None or isinstance(value, SamplingParams):
        return [value] * n
    if not isinstance(value, Sequence) or len(value) != n:
        raise RequestError(f"{name} must be a single value or a list with one entry per prompt ({n})")
    return list(value)
