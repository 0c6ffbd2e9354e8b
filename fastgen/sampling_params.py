"""Sampling parameters of one request; ``None`` fields take the checkpoint's generation_config.json values."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, fields
from typing import Any

from fastgen.errors import RequestError

SEED_MAX = 2**63 - 1


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RequestError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    duration: float | None = None        # seconds of new audio (an audio prompt's length comes on top)
    max_new_tokens: int | None = None    # decode steps, as in transformers (alternative to duration)
    guidance_scale: float | None = None  # classifier-free guidance; 1 = off
    temperature: float | None = None
    top_k: int | None = None             # 0 = off
    top_p: float | None = None           # 0 or 1 = off (0 as in audiocraft)
    do_sample: bool | None = None        # False = greedy
    seed: int | None = None              # None = a fresh random seed, reported in the output
    extend_stride: float | None = None   # long-form: seconds each window after the first adds (None: 18 s; see
                                         # fastgen/engine/longform.py); the engine checks it against its window

    def __post_init__(self) -> None:
        if self.duration is not None:
            _check(_is_number(self.duration) and self.duration > 0,
                   f"duration must be a positive number of seconds, got {self.duration!r}")
        if self.max_new_tokens is not None:
            _check(isinstance(self.max_new_tokens, int) and not isinstance(self.max_new_tokens, bool)
                   and self.max_new_tokens >= 1, f"max_new_tokens must be an integer ≥ 1, got {self.max_new_tokens!r}")
        _check(self.duration is None or self.max_new_tokens is None,
               "give either duration or max_new_tokens, not both")
        if self.guidance_scale is not None:
            _check(_is_number(self.guidance_scale) and 0 <= self.guidance_scale <= 100,
                   f"guidance_scale must be a number in [0, 100], got {self.guidance_scale!r}")
        if self.temperature is not None:
            _check(_is_number(self.temperature) and 0 < self.temperature <= 100,
                   f"temperature must be a number in (0, 100], got {self.temperature!r} "
                   "(use do_sample=False for greedy decoding)")
        if self.top_k is not None:
            _check(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
                   f"top_k must be an integer ≥ 0 (0 = off), got {self.top_k!r}")
        if self.top_p is not None:
            _check(_is_number(self.top_p) and 0 <= self.top_p <= 1,
                   f"top_p must be a number in [0, 1] (0 or 1 = off), got {self.top_p!r}")
        if self.do_sample is not None:
            _check(isinstance(self.do_sample, bool), f"do_sample must be True or False, got {self.do_sample!r}")
        if self.seed is not None:
            _check(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= SEED_MAX,
                   f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        if self.extend_stride is not None:
            _check(_is_number(self.extend_stride) and self.extend_stride > 0,
                   f"extend_stride must be a positive number of seconds (below the window), got {self.extend_stride!r}")

    def with_defaults(self, defaults: "SamplingParams") -> "SamplingParams":
        """Fill None fields from ``defaults`` (the checkpoint's generation config)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in values.items():
            if value is None:
                values[name] = getattr(defaults, name)
        if self.duration is not None or self.max_new_tokens is not None:  # the request's own length wins
            values["duration"], values["max_new_tokens"] = self.duration, self.max_new_tokens
        return SamplingParams(**values)

    @classmethod
    def from_generation_config(cls, config: dict[str, Any], prompt_positions: int = 1) -> "SamplingParams":
        """Defaults from generation_config.json. Its max_length counts the BOS position too."""
        max_length = config.get("max_length")
        max_new = config.get("max_new_tokens")
        if max_new is None and isinstance(max_length, int) and max_length > prompt_positions:
            max_new = max_length - prompt_positions
        top_k = config.get("top_k")
        top_p = config.get("top_p")
        temperature = config.get("temperature")
        guidance = config.get("guidance_scale")
        return cls(
            max_new_tokens=max_new if isinstance(max_new, int) and max_new > 0 else None,
            guidance_scale=float(guidance) if _is_number(guidance) else None,
            temperature=float(temperature) if _is_number(temperature) and temperature > 0 else None,
            top_k=top_k if isinstance(top_k, int) and top_k >= 0 else None,
            top_p=float(top_p) if _is_number(top_p) and 0 <= top_p <= 1 else None,
            do_sample=config.get("do_sample") if isinstance(config.get("do_sample"), bool) else None,
        )


# What a request runs with when neither the caller nor the checkpoint says (transformers' GenerationConfig defaults,
# except length: 10 s).
BUILTIN_DEFAULTS = SamplingParams(duration=10.0, guidance_scale=3.0, temperature=1.0, top_k=250, top_p=0.0,
                                  do_sample=True)


@dataclass(frozen=True, slots=True)
class ResolvedParams:
    """Concrete per-request values the runner loads into its slot tensors."""
    new_frames: int
    guidance_scale: float
    temperature: float   # 0 = greedy
    top_k: int           # 0 = off
    top_p: float         # 1 = off
    seed: int

    @classmethod
    def resolve(cls, params: SamplingParams, *, frame_rate: int, channel_codebooks: int) -> "ResolvedParams":
        if params.max_new_tokens is not None:
            # transformers: max_new_tokens decode steps → the delay pattern eats channel_codebooks - 1 of them.
            new_frames = params.max_new_tokens + 1 - channel_codebooks
            _check(new_frames >= 1, f"max_new_tokens must be ≥ {channel_codebooks} for a model with "
                                    f"{channel_codebooks} codebooks per channel, got {params.max_new_tokens}")
        else:
            assert params.duration is not None
            new_frames = max(1, round(params.duration * frame_rate))
        greedy = params.do_sample is False
        top_p = params.top_p if params.top_p not in (None, 0.0) else 1.0
        return cls(
            new_frames=new_frames,
            # transformers applies CFG only for a scale > 1: anything lower means the conditional logits alone
            guidance_scale=max(1.0, float(params.guidance_scale if params.guidance_scale is not None else 1.0)),
            temperature=0.0 if greedy else float(params.temperature or 1.0),
            top_k=int(params.top_k or 0),
            top_p=float(top_p),
            seed=params.seed if params.seed is not None else secrets.randbits(63),
        )
