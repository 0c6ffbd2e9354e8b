"""The user-facing entry point: ``fastgen.MusicGen.from_pretrained(...).generate(prompts, params)``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from fastgen.config import EngineConfig
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
        config = EngineConfig(**engine_options)  # validated before any loading
        model = MusicgenModel.load(name_or_path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                   quantization=config.quantization)
        return cls(Engine(model, config))

    @property
    def sample_rate(self) -> int:
        return self.engine.sample_rate

    @property
    def defaults(self) -> SamplingParams:
        return self.engine.model.defaults

    def generate(self, prompts: Sequence[str | None], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 audio_prompts: Sequence[tuple[Any, int] | None] | None = None,
                 progress: bool = False) -> list[GenerationOutput]:
        """Generate one output per prompt (None = unconditional), in order. Raises RequestError for invalid input
        before any work starts, and RequestFailed if a request fails while running (after the others finish)."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise RequestError("prompts must be a list of strings or None, e.g. ['lofi beat']")
        n = len(prompts)
        per_prompt = _broadcast(params, n, "params")
        if isinstance(audio_prompts, tuple) and len(audio_prompts) == 2 and isinstance(audio_prompts[1], int):
            audio_prompts = [audio_prompts] * n  # one (waveform, sample_rate) continued by every prompt
        audio = _broadcast(audio_prompts, n, "audio_prompts") if audio_prompts is not None else [None] * n
        requests = [self.engine.make_request(p, sp, a, name=f"prompts[{i}]")
                    for i, (p, sp, a) in enumerate(zip(prompts, per_prompt, audio))]
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


def _broadcast(value: Any, n: int, name: str) -> list[Any]:
    if value is None or isinstance(value, SamplingParams):
        return [value] * n
    if not isinstance(value, Sequence) or len(value) != n:
        raise RequestError(f"{name} must be a single value or a list with one entry per prompt ({n})")
    return list(value)
