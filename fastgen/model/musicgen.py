"""A loaded MusicGen: fastgen's decoder plus transformers' T5 encoder and EnCodec, on one device."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastgen.config import ModelConfig
from fastgen.errors import CheckpointError
from fastgen.model.chroma import ChromaSettings
from fastgen.model.codec import AudioCodec, TextEncoder, quiet_token_id_warnings
from fastgen.model.decoder import MusicgenDecoder
from fastgen.model.checkpoint import load_parts
from fastgen.model.melody import MelodyPrefix
from fastgen.model.quantize import validate_quantization
from fastgen.sampling_params import BUILTIN_DEFAULTS, SamplingParams

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def normalize_device(device: str | torch.device) -> torch.device:
    """The device every tensor and cache of the model is keyed by: ``cuda`` becomes ``cuda:<current index>`` once,
    here, because torch.device("cuda") and torch.device("cuda:0") compare unequal (and hash apart)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device is {str(device)!r} but no CUDA device is available")
    index = torch.cuda.current_device() if device.index is None else device.index
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"device is {str(device)!r} but only {torch.cuda.device_count()} CUDA device(s) exist "
                         f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: bf16 GEMMs in hardware (elsewhere oneDNN emulates them, slower than fp32)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def parse_dtype(dtype: torch.dtype | str | None, device: torch.device, quantization: str | None = None,
                compiled: bool = False) -> torch.dtype:
    """The decoder's dtype. Default: bf16 on CUDA and on CPUs with native bf16 (half the weight bytes per step, which
    bound a decode step), float32 elsewhere. On a CPU with quantised projections the weights' bytes do not depend on
    it, only the activations' and the KV cache's do, and the rest of the step decides (musicgen-small, AMD EPYC, 2
    threads, int4): eagerly fp32 (20 ms a step at positions 30-250 against 22 ms in bf16, though 38 against 35 ms at
    1500); under compile_step bf16, whose halved KV cache inductor's attention reads faster (14 / 18 / 23 ms at
    positions 30 / 250 / 1500 against 14 / 20 / 30 ms in fp32). T5 and EnCodec run in float32 whatever this is
    (fastgen.model.codec)."""
    if dtype is None:
        native_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        if quantization is not None and device.type == "cpu" and not compiled:
            return torch.float32
        return torch.bfloat16 if native_bf16 else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@dataclass
class MusicgenModel:
    folder: Path
    config: ModelConfig
    decoder: MusicgenDecoder
    text_encoder: TextEncoder
    codec: AudioCodec
    defaults: SamplingParams  # generation_config.json over fastgen's built-in defaults
    melody: MelodyPrefix | None = None       # a MusicGen-Melody checkpoint: its prefix rule …
    chroma: ChromaSettings | None = None     # … and its feature extractor's settings (preprocessor_config.json)

    @classmethod
    def load(cls, name_or_path: str | Path, *, device: str | torch.device = "cpu",
             dtype: torch.dtype | str | None = None, allow_pickle: bool = False,
             quantization: str | None = None, compiled: bool = False, text_encoder: str | Path | None = None,
             audio_encoder: str | Path | None = None) -> "MusicgenModel":
        """``quantization="int8"``: weight-only int8 decoder projections and LM heads (fastgen.model.quantize),
        quantised from the checkpoint's float weights; ``"int8-dynamic"`` (CPU): the same weights with 8-bit
        activations quantised per call; ``"int4"`` (CPU): 4-bit weights in groups of 64. ``compiled``: the engine
        will compile its step (EngineConfig.compile_step), which changes the default dtype (parse_dtype).
        ``text_encoder`` / ``audio_encoder``: the T5 and EnCodec of an audiocraft export (fastgen.model.audiocraft:
        Hugging Face folders or hub ids; default the models its files name)."""
        device = normalize_device(device)
        validate_quantization(quantization, device)
        dtype = parse_dtype(dtype, device, quantization, compiled)
        parts = load_parts(name_or_path, allow_pickle=allow_pickle, text_encoder=text_encoder,
                           audio_encoder=audio_encoder)
        config = parts.config
        decoder = MusicgenDecoder(config.decoder, parts.weights, text_hidden_size=config.text_hidden_size,
                                  device=device, dtype=dtype, quantization=quantization, melody=config.melody)
        with quiet_token_id_warnings():  # AutoTokenizer builds a MusicgenConfig from config.json
            text_encoder = TextEncoder(parts.tokenizer_folder or parts.folder, config.text_encoder, parts.weights,
                                       device)
        codec = AudioCodec(config.audio_encoder, parts.weights, device, config.decoder.audio_channels)
        defaults = SamplingParams.from_generation_config(parts.generation_config).with_defaults(BUILTIN_DEFAULTS)
        melody = chroma = None
        if config.melody is not None:
            # an unconditional request's text is T5's tokens of "" masked out, as transformers' processor makes it
            melody = MelodyPrefix(config.melody, null_text_tokens=max(1, len(text_encoder.tokenize(""))))
            chroma = parts.chroma or ChromaSettings.from_folder(parts.folder)
            if chroma.num_chroma != config.melody.num_chroma:
                raise CheckpointError(f"{parts.folder}: the feature extractor makes {chroma.num_chroma} chroma bins, "
                                      f"the model takes num_chroma={config.melody.num_chroma}")
        return cls(parts.folder, config, decoder, text_encoder, codec, defaults, melody, chroma)

