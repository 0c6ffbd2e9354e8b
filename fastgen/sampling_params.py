"""Sampling parameters of one request; ``None`` fields take the checkpoint's generation_config.json values."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, fields
from typing import Any

from fastgen.errors import RequestError

SEED_MAX = 2**63 - 1
MAX_NEW_TOKENS = 2**20          # decode steps; like duration, an absolute bound before each engine's own limit
TOP_K_MAX = 2**31 - 1          # the sampler keeps top_k in int32; any top_k ≥ the vocabulary means "off" anyway
MAX_DURATION_S = 3600.0         # an absolute sanity bound; each engine refuses what is over its own, lower limit
# Below these a sampler in float32 breaks down (logits / 1e-40 overflow to inf; top_p 1e-50 rounds to 0): the limit
# of sampling as temperature or top_p → 0 is picking the most likely token, so such requests are decoded greedily.
GREEDY_BELOW_TEMPERATURE = 1e-4
GREEDY_BELOW_TOP_P = 1e-6


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RequestError(message)


def _is_number(value: Any) -> bool:
    """A finite real number (an int too large for a float, such as 10**400, is not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _shown(value: Any) -> str:
    """The value for an error message, cut short (a caller may send 10**400)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:30] + f"… ({len(text)} characters)"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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

    def __post_init__(self) -> None:
        if self.duration is not None:
            _check(_is_number(self.duration) and 0 < self.duration <= MAX_DURATION_S,
                   f"duration must be a positive number of seconds, at most {MAX_DURATION_S:g}, got "
                   f"{_shown(self.duration)}")
        if self.max_new_tokens is not None:
            _check(_is_int(self.max_new_tokens) and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS,
                   f"max_new_tokens must be an integer ≥ 1 (at most {MAX_NEW_TOKENS}), "
                   f"got {_shown(self.max_new_tokens)}")
        _check(self.duration is None or self.max_new_tokens is None,
               "give either duration or max_new_tokens, not both")
        if self.guidance_scale is not None:
            _check(_is_number(self.guidance_scale) and 0 <= self.guidance_scale <= 100,
                   f"guidance_scale must be a number in [0, 100], got {_shown(self.guidance_scale)}")
        if self.temperature is not None:
            _check(_is_number(self.temperature) and 0 < self.temperature <= 100,
                   f"temperature must be a number in (0, 100], got {_shown(self.temperature)} "
                   f"(use do_sample=False for greedy decoding; below {GREEDY_BELOW_TEMPERATURE:g} it is greedy)")
        if self.top_k is not None:
            _check(_is_int(self.top_k) and 0 <= self.top_k <= TOP_K_MAX,
                   f"top_k must be an integer in [0, 2**31 - 1] (0 = off), got {_shown(self.top_k)}")
        if self.top_p is not None:
            _check(_is_number(self.top_p) and 0 <= self.top_p <= 1,
                   f"top_p must be a number in [0, 1] (0 or 1 = off; a positive top_p below "
                   f"{GREEDY_BELOW_TOP_P:g} is greedy), got {_shown(self.top_p)}")
        if self.do_sample is not None:
            _check(isinstance(self.do_sample, bool), f"do_sample must be True or False, got {_shown(self.do_sample)}")
        if self.seed is not None:
            _check(_is_int(self.seed) and 0 <= self.seed <= SEED_MAX,
                   f"seed must be an integer in [0, 2**63 - 1], got {_shown(self.seed)}")

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
        candidates = {
            "max_new_tokens": max_new,
            "guidance_scale": float(config["guidance_scale"]) if _is_number(config.get("guidance_scale")) else None,
            "temperature": float(config["temperature"]) if _is_number(config.get("temperature")) else None,
            "top_k": config.get("top_k"),
            "top_p": float(config["top_p"]) if _is_number(config.get("top_p")) else None,
            "do_sample": config.get("do_sample"),
        }
        values = {}
        for name, value in candidates.items():  # a value we would refuse from a caller is no default either
            try:
                cls(**{name: value})
            except RequestError:
                continue
            values[name] = value
        return cls(**values)


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
    def resolve(cls, params: SamplingParams, *, frame_rate: int, channel_codebooks: int,
                vocab_size: int | None = None) -> "ResolvedParams":
        if params.max_new_tokens is not None:
            # transformers: max_new_tokens decode steps → the delay pattern eats channel_codebooks - 1 of them.
            new_frames = params.max_new_tokens + 1 - channel_codebooks
            _check(new_frames >= 1, f"max_new_tokens must be ≥ {channel_codebooks} for a model with "
                                    f"{channel_codebooks} codebooks per channel, got {params.max_new_tokens}")
        else:
            assert params.duration is not None
            new_frames = max(1, round(params.duration * frame_rate))
        top_p = params.top_p if params.top_p not in (None, 0.0) else 1.0
        # the limits of sampling as temperature → 0 or top_p → 0 (only the most likely token left): greedy
        greedy = (params.do_sample is False or (params.temperature or 1.0) < GREEDY_BELOW_TEMPERATURE
                  or top_p < GREEDY_BELOW_TOP_P)
        top_k = int(params.top_k or 0)
        if vocab_size is not None and top_k >= vocab_size:  # keeps every token: the filter is off
            top_k = 0
        return cls(
            new_frames=new_frames,
            # transformers applies CFG only for a scale > 1: anything lower means the conditional logits alone
            guidance_scale=max(1.0, float(params.guidance_scale if params.guidance_scale is not None else 1.0)),
            temperature=0.0 if greedy else float(params.temperature or 1.0),
            top_k=top_k,
            top_p=float(top_p),
            seed=params.seed if params.seed is not None else secrets.randbits(63),
        )
