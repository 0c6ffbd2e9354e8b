"""Configuration: the decoder architecture read from a checkpoint's config.json, and the engine's knobs."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastgen.errors import CheckpointError

SUPPORTED_ACTIVATIONS = ("gelu", "relu", "silu", "gelu_new")
# MusicGen was trained on 30 s windows: positions past that are out of distribution (transformers documents the
# same limit: "MusicGen cannot generate more than 30 seconds of audio").
TRAINED_DURATION_S = 30.0
# Requests longer than the window slide over it (fastgen/engine/longform.py): an engine accepts up to max_duration_s,
# by default this, at most the absolute bound (a sane cap on one request's work and host-side codes).
DEFAULT_MAX_DURATION_S = 300.0
MAX_REQUEST_DURATION_S = 3600.0
# A multi-step call runs a request that finishes inside it on, past its end, for up to this many − 1 positions (on
# pad tokens; discarded): caches and the position table carry that margin.
MAX_STEPS_PER_CALL = 16
# Upper bounds on a checkpoint's sizes, far above any MusicGen (large: 48 layers, width 2048, 8 codebooks), checked
# before anything is allocated: a corrupt config.json (num_hidden_layers 1e9) must fail at once, not hang the loader.
DECODER_SIZE_LIMITS = {"vocab_size": 1 << 16, "hidden_size": 1 << 14, "num_layers": 256, "num_heads": 256,
                       "ffn_dim": 1 << 17, "num_codebooks": 32, "max_position_embeddings": 1 << 16}
SUBCONFIG_INT_LIMIT = 1 << 17  # any integer size in the T5 / EnCodec sections (T5 v1.1 XXL's d_ff is 10240)
SUBCONFIG_LAYER_LIMIT = 256   # layer counts there (num_layers, num_residual_layers, num_lstm_layers …)
DEFAULT_MAX_WAITING = 256


# "int8": weight-only (activations stay in the model's dtype). "int8-dynamic": the same int8 weights, and each
# projection's input quantised to 8 bits on the fly (one asymmetric scale per call, fbgemm's dynamic linear): the
# integer GEMV streams the weights 1.2-1.6x as fast as the weight-only kernel on a CPU, at the cost of an
# activation rounding error (measured beside weight-only int8 by bench/quant_deviation.py). CPU only.
# "int4": weight-only, 4-bit codes per group of 64 (aten's CPU int4 kernel). CPU only.
QUANTIZATIONS = (None, "int8", "int8-dynamic", "int4")
CPU_ONLY_QUANTIZATIONS = {"int8-dynamic": "fbgemm's dynamic int8 linear", "int4": "aten's CPU int4 kernel"}
FUSED_KERNEL_QUANTIZATIONS = (None, "int8")  # what the Triton fused projections (linear_backend="triton") read
QUANTIZE_HELP = ("quantised decoder projections: int8 weight-only; int8-dynamic (CPU) with activations quantised "
                 "per call too; int4 (CPU) weight-only in groups of 64")


def validate_quantization(quantization: str | None, device: str | None = None) -> str | None:
    if quantization not in QUANTIZATIONS:
        allowed = ", ".join(repr(q) for q in QUANTIZATIONS)
        raise ValueError(f"quantization must be one of {allowed}, got {quantization!r}")
    if quantization in CPU_ONLY_QUANTIZATIONS and device is not None and not str(device).startswith("cpu"):
        raise ValueError(f"quantization={quantization!r} runs on a CPU only ({CPU_ONLY_QUANTIZATIONS[quantization]}); "
                         f"use quantization='int8' on {device}")
    return quantization


@dataclass(frozen=True, slots=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    num_codebooks: int
    audio_channels: int
    max_position_embeddings: int
    activation: str
    pad_token_id: int

    def __post_init__(self) -> None:
        for name, limit in DECODER_SIZE_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
                raise CheckpointError(f"decoder config: {name} must be an integer in [1, {limit}], got {value!r}")
        if self.hidden_size % self.num_heads:
            raise CheckpointError(
                f"decoder config: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_heads}")
        if self.audio_channels not in (1, 2):
            raise CheckpointError(f"decoder config: audio_channels must be 1 or 2, got {self.audio_channels!r}")
        if self.num_codebooks % self.audio_channels:
            raise CheckpointError(
                f"decoder config: num_codebooks {self.num_codebooks} must split evenly over "
                f"{self.audio_channels} audio channels")
        if self.activation not in SUPPORTED_ACTIVATIONS:
            raise CheckpointError(
                f"decoder config: activation_function {self.activation!r} is not one of {SUPPORTED_ACTIVATIONS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def channel_codebooks(self) -> int:
        """Codebooks per audio channel: the delay pattern's depth."""
        return self.num_codebooks // self.audio_channels


MELODY_LIMITS = {"num_chroma": 128, "chroma_length": 4096}  # facebook/musicgen-melody: 12 bins, 235 frames (30 s)


@dataclass(frozen=True, slots=True)
class MelodyConfig:
    """A MusicGen-Melody checkpoint (model_type musicgen_melody): its decoder has no cross-attention; the chroma of a
    melody (``num_chroma`` bins per frame, fitted to ``chroma_length`` frames) and the text form a prefix of the
    decoder's self-attention sequence (fastgen.model.melody)."""
    num_chroma: int = 12
    chroma_length: int = 235

    def __post_init__(self) -> None:
        for name, limit in MELODY_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
                raise CheckpointError(f"config: {name} must be an integer in [1, {limit}], got {value!r}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything fastgen needs from a MusicGen checkpoint folder."""
    decoder: DecoderConfig
    text_encoder: dict[str, Any]   # T5Config kwargs
    audio_encoder: dict[str, Any]  # EncodecConfig kwargs
    text_hidden_size: int
    sample_rate: int
    frame_rate: int
    melody: MelodyConfig | None = None  # set for MusicGen-Melody checkpoints

    @property
    def has_enc_to_dec_proj(self) -> bool:
        return self.text_hidden_size != self.decoder.hidden_size

    @property
    def max_frames(self) -> int:
        """Frames one window may span (a longer request slides over windows): the trained 30 s, and the positional
        table's size."""
        trained = int(TRAINED_DURATION_S * self.frame_rate)
        by_positions = self.decoder.max_position_embeddings - self.decoder.channel_codebooks
        return min(trained, by_positions)

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: config.json is missing from the checkpoint folder") from None
        except ValueError as exc:  # bad JSON (JSONDecodeError) or bad UTF-8 (UnicodeDecodeError)
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Accepts the transformers 4.x and 5.x serialisations of MusicgenConfig (same sub-config keys; 5.x drops
        some defaults and renames torch_dtype → dtype, neither of which we read). Any malformed value is a
        CheckpointError naming the file."""
        try:
            return cls._from_dict(raw, source)
        except CheckpointError:
            raise
        except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as exc:
            raise CheckpointError(f"{source}: malformed value ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _from_dict(cls, raw: dict[str, Any], source: str) -> "ModelConfig":
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("model_type") not in ("musicgen", "musicgen_melody", None):
            raise CheckpointError(f"{source}: model_type is {raw.get('model_type')!r}, expected 'musicgen' or "
                                  "'musicgen_melody'")
        melody = None
        if raw.get("model_type") == "musicgen_melody":
            melody = MelodyConfig(raw.get("num_chroma", 12), raw.get("chroma_length", 235))
        sections = {}
        for key in ("decoder", "text_encoder", "audio_encoder"):
            section = raw.get(key)
            if not isinstance(section, dict):
                raise CheckpointError(f"{source}: the '{key}' section is missing; is this a MusicGen checkpoint?")
            sections[key] = section
        dec = sections["decoder"]

        def need(name: str, default: Any = dataclasses.MISSING) -> Any:
            if name in dec:
                return dec[name]
            if default is dataclasses.MISSING:
                raise CheckpointError(f"{source}: decoder.{name} is missing")
            return default

        vocab_size = need("vocab_size", 2048)
        decoder = DecoderConfig(
            vocab_size=vocab_size,
            hidden_size=need("hidden_size", 1024),
            num_layers=need("num_hidden_layers", 24),
            num_heads=need("num_attention_heads", 16),
            ffn_dim=need("ffn_dim", 4096),
            num_codebooks=need("num_codebooks", 4),
            audio_channels=need("audio_channels", 1),
            max_position_embeddings=need("max_position_embeddings", 2048),
            activation=need("activation_function", "gelu"),
            pad_token_id=dec.get("pad_token_id") if dec.get("pad_token_id") is not None else vocab_size,
        )
        if decoder.pad_token_id != decoder.vocab_size:
            raise CheckpointError(f"{source}: decoder.pad_token_id must be vocab_size ({vocab_size}), the extra "
                                  f"embedding row; got {decoder.pad_token_id}")
        if dec.get("cross_attention_hidden_size") not in (None, sections["text_encoder"].get("d_model")):
            raise CheckpointError(f"{source}: decoder.cross_attention_hidden_size must equal the text encoder's "
                                  "d_model when set")
        for key in ("text_encoder", "audio_encoder"):
            _check_sizes(sections[key], f"{source}: {key}")
        audio = sections["audio_encoder"]
        sample_rate = _positive_int(audio.get("sampling_rate", 24000), f"{source}: audio_encoder.sampling_rate")
        hop = 1
        ratios = audio.get("upsampling_ratios", [8, 5, 4, 2])
        if not isinstance(ratios, list) or not 1 <= len(ratios) <= 16:
            raise CheckpointError(f"{source}: audio_encoder.upsampling_ratios must be a list of 1 to 16 integers, "
                                  f"got {ratios!r}")
        for ratio in ratios:
            hop *= _positive_int(ratio, f"{source}: audio_encoder.upsampling_ratios")
        if sample_rate % hop or sample_rate // hop < 1:
            raise CheckpointError(f"{source}: audio_encoder sampling_rate {sample_rate} is not a multiple of the "
                                  f"codec hop {hop}")
        if int(audio.get("codebook_size", 1024)) != vocab_size:
            raise CheckpointError(f"{source}: audio_encoder.codebook_size {audio.get('codebook_size')} must equal "
                                  f"decoder.vocab_size {vocab_size}")
        text_hidden = _positive_int(sections["text_encoder"].get("d_model", 512), f"{source}: text_encoder.d_model")
        return cls(decoder=decoder, text_encoder=sections["text_encoder"], audio_encoder=audio,
                   text_hidden_size=int(text_hidden), sample_rate=sample_rate, frame_rate=sample_rate // hop,
                   melody=melody)


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= SUBCONFIG_INT_LIMIT:
        raise CheckpointError(f"{name} must be an integer in [1, {SUBCONFIG_INT_LIMIT}], got {value!r}")
    return value


def _check_sizes(section: dict[str, Any], name: str) -> None:
    """Every integer of a transformers sub-config (layer counts, widths, kernel sizes …) within a sane bound, so that
    building the module from it cannot hang or exhaust memory; transformers validates the rest."""
    for key, value in section.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            limit = SUBCONFIG_LAYER_LIMIT if "layers" in key else SUBCONFIG_INT_LIMIT
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) > limit \
                    and not key.endswith("_token_id"):
                raise CheckpointError(f"{name}.{key} is {item!r}, over the sane bound of {limit}")
        if isinstance(value, list) and len(value) > 64:
            raise CheckpointError(f"{name}.{key} is a list of {len(value)} items, over the sane bound of 64")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Knobs of the runtime. Slots are CFG pairs of KV-cache rows, each holding one window of one request: the trained
    30 s (or ``window_s``), or ``max_duration_s`` when that is shorter. Requests up to ``max_duration_s`` seconds
    (prompt included) are accepted; longer than the window, they slide over it (see fastgen/engine/longform.py)."""
    max_slots: int | None = None          # None: as many as the memory budget allows (capped at 256)
    max_duration_s: float | None = None   # longest request, prompt included; None: DEFAULT_MAX_DURATION_S (300 s)
    window_s: float | None = None         # the sliding window (and slot span); None: the trained 30 s
    max_text_tokens: int = 256
    kv_cache_memory_bytes: int | None = None  # None: a share of free device memory (CUDA) or 2 GiB (CPU)
    backend: str = "auto"                 # "torch", "triton", or "auto" (triton on CUDA, torch on CPU)
    enforce_eager: bool = False           # disable CUDA graphs (debugging)
    overlap_stages: bool | None = None    # T5 and EnCodec on a worker thread (own CUDA stream); None: on CUDA
    compile_step: bool = False            # torch backend: torch.compile the decode step (see ModelRunner)
    steps_per_call: int = 1               # decode steps per graph replay / engine step (see Engine.step)
    # requests accepted and not yet started, beyond which add_request / submit raise QueueFull (None: unbounded).
    # Bounds what waiting requests hold (an audio prompt: up to a few MB each); MusicGen.generate is not bounded
    # by it (its requests are the caller's list)
    max_waiting: int | None = DEFAULT_MAX_WAITING
    quantization: str | None = None       # "int8": weight-only int8 decoder projections (from_pretrained loads so)
    # the decode step's projections: "triton" (fused, batch-invariant kernels: fastgen.kernels.fused_linear) or
    # "torch" (LayerNorm / GEMM / activation / add as separate operators); None: "triton" where the backend resolves
    # to triton on CUDA, else "torch" (the CPU interpreter runs the fused kernels only when asked: they are slow there)
    linear_backend: str | None = None

    def __post_init__(self) -> None:
        if self.max_slots is not None and (not isinstance(self.max_slots, int) or self.max_slots < 1):
            raise ValueError(f"max_slots must be a positive integer or None, got {self.max_slots!r}")
        if self.max_duration_s is not None and not (_is_seconds(self.max_duration_s)
                                                    and 0 < self.max_duration_s <= MAX_REQUEST_DURATION_S):
            raise ValueError(f"max_duration_s must be a number of seconds in (0, {MAX_REQUEST_DURATION_S:g}], "
                             f"got {self.max_duration_s!r}")
        if self.window_s is not None and not (_is_seconds(self.window_s) and 0 < self.window_s <= TRAINED_DURATION_S):
            raise ValueError(f"window_s must be a number of seconds in (0, {TRAINED_DURATION_S:g}], got {self.window_s!r}")
        if not isinstance(self.max_text_tokens, int) or not 1 <= self.max_text_tokens <= 4096:
            raise ValueError(f"max_text_tokens must be an integer in [1, 4096], got {self.max_text_tokens!r}")
        budget = self.kv_cache_memory_bytes
        if budget is not None and not (isinstance(budget, (int, float)) and not isinstance(budget, bool)
                                       and math.isfinite(budget) and budget >= 1):
            raise ValueError(f"kv_cache_memory_bytes must be a finite number of bytes ≥ 1 (or None), got {budget!r}")
        if self.max_waiting is not None and (not isinstance(self.max_waiting, int) or isinstance(self.max_waiting, bool)
                                             or self.max_waiting < 1):
            raise ValueError(f"max_waiting must be a positive integer or None (unbounded), got {self.max_waiting!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {self.backend!r}")
        if not isinstance(self.steps_per_call, int) or not 1 <= self.steps_per_call <= MAX_STEPS_PER_CALL:
            raise ValueError(f"steps_per_call must be an integer in [1, {MAX_STEPS_PER_CALL}], "
                             f"got {self.steps_per_call!r}")
        validate_quantization(self.quantization)
        if self.linear_backend not in (None, "triton", "torch"):
            raise ValueError(f"linear_backend must be None, 'triton' or 'torch', got {self.linear_backend!r}")
        if self.linear_backend == "triton" and self.backend == "torch":
            raise ValueError("linear_backend='triton' needs backend='triton' (or 'auto' on CUDA): the fused "
                             "projections are Triton kernels; use linear_backend='torch' with backend='torch'")
        if self.linear_backend == "triton" and self.quantization not in FUSED_KERNEL_QUANTIZATIONS:
            raise ValueError(f"linear_backend='triton' runs weight-only int8 (quantization='int8'), not "
                             f"{self.quantization!r} (CPU kernels); use linear_backend='torch' for it")
        if not isinstance(self.compile_step, bool):
            raise ValueError(f"compile_step must be True or False, got {self.compile_step!r}")


def _is_seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """How long a request, its windows and a slot may be, in codec frames: the one rule, used by the Engine to size its
    slots and check requests, and by MusicGen.inspect to check a job before any weights load."""
    window: int   # one window: the trained 30 s (or EngineConfig.window_s); a longer request slides over windows
    request: int  # the longest request, prompt included: EngineConfig.max_duration_s (default 300 s)
    slot: int     # what a slot holds: one window, or the longest request when that is shorter

    @classmethod
    def of(cls, model: ModelConfig, engine: EngineConfig) -> "FrameLimits":
        window = model.max_frames
        if engine.window_s is not None:
            window = min(window, round(engine.window_s * model.frame_rate))
        request = round((engine.max_duration_s or DEFAULT_MAX_DURATION_S) * model.frame_rate)
        return cls(window, request, min(window, request))
