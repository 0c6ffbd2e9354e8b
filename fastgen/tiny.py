"""Random-weight MusicGen checkpoints in Hugging Face format.

Two builders share the same layout (``config.json``, ``model.safetensors``,
``generation_config.json``, tokenizer and feature-extractor files), so every
loader in fastgen and in transformers reads them exactly like a hub download:

* :func:`build_tiny_checkpoint` writes a model small enough for unit tests.
  Its weights are re-initialised so that greedy decoding has clear winners
  and the EnCodec quantizer produces varied codes.
* :func:`build_checkpoint` writes the real small/medium/large architectures
  with default random weights, for benchmarks.

Nothing here needs the network: the tokenizer is built from a fixed word list.

Usage: ``python -m fastgen.tiny OUT_DIR [--stereo] [--size tiny|small|medium|large]``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
from collections.abc import Sequence

import torch
from transformers import (
    EncodecConfig,
    EncodecFeatureExtractor,
    GenerationConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    T5Config,
)

from fastgen.model.codec import quiet_token_id_warnings
from fastgen.tiny_tokenizer import _text_vocab_size, build_tokenizer, save_tokenizer
from fastgen.tiny_weights import (SAMPLING_RATE, _fill_zero_codebooks, _init_codebooks, _reinit_codec,
                                  _reinit_decoder, _seeded)

__all__ = [
    "SIZES",
    "build_checkpoint",
    "build_tiny_checkpoint",
    "build_tokenizer",
    "generation_config",
    "real_config",
    "save_tokenizer",
    "tiny_config",
]

# 8 * 5 * 4 * 4 = 640 samples per frame -> 50 codec frames per second, like MusicGen's EnCodec.
UPSAMPLING_RATIOS = [8, 5, 4, 4]
CODEBOOKS_PER_CHANNEL = 4

# Decoder shapes of the published checkpoints: (hidden, layers, heads, ffn).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "small": (1024, 24, 16, 4096),
    "medium": (1536, 48, 24, 6144),
    "large": (2048, 48, 32, 8192),
}

# Files a build writes; an existing folder holding any of them is only replaced with overwrite=True.
_CHECKPOINT_GLOBS = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
)

# ---------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------


def _encodec_config(*, hidden_size: int, num_filters: int, codebook_size: int) -> EncodecConfig:
    # Bandwidth giving exactly CODEBOOKS_PER_CHANNEL quantizers: bits per codebook * 50 Hz each.
    frame_rate = SAMPLING_RATE / math.prod(UPSAMPLING_RATIOS)
    bandwidth_kbps = CODEBOOKS_PER_CHANNEL * math.log2(codebook_size) * frame_rate / 1000
    config = EncodecConfig(
        sampling_rate=SAMPLING_RATE,
        audio_channels=1,  # musicgen-stereo decodes each channel with a mono codec
        upsampling_ratios=list(UPSAMPLING_RATIOS),
        target_bandwidths=[round(bandwidth_kbps, 6)],
        hidden_size=hidden_size,
        num_filters=num_filters,
        codebook_size=codebook_size,
        codebook_dim=hidden_size,
        num_lstm_layers=2,
        num_residual_layers=1,
        use_causal_conv=False,  # MusicGen's 32 kHz EnCodec is non-causal
        use_conv_shortcut=False,
        normalize=False,
        chunk_length_s=None,
        overlap=None,
    )
    if config.num_quantizers != CODEBOOKS_PER_CHANNEL:
        raise AssertionError(f"EnCodec config yields {config.num_quantizers} quantizers")
    return config


def _musicgen_config(
    text_encoder: T5Config,
    audio_encoder: EncodecConfig,
    *,
    hidden: int,
    layers: int,
    heads: int,
    ffn: int,
    max_positions: int,
    stereo: bool,
) -> MusicgenConfig:
    vocab_size = audio_encoder.codebook_size
    channels = 2 if stereo else 1
    decoder = MusicgenDecoderConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=ffn,
        max_position_embeddings=max_positions,
        num_codebooks=CODEBOOKS_PER_CHANNEL * channels,
        audio_channels=channels,
        # The extra embedding row (id == vocab_size) is MusicGen's pad/BOS token.
        pad_token_id=vocab_size,
        bos_token_id=vocab_size,
    )
    return MusicgenConfig(
        text_encoder=text_encoder,
        audio_encoder=audio_encoder,
        decoder=decoder,
        pad_token_id=vocab_size,
        decoder_start_token_id=vocab_size,
    )


def tiny_config(*, stereo: bool = False, decoder_layers: int = 2) -> MusicgenConfig:
    """Test-sized MusicGen: T5 width 32 != decoder width 64, so enc_to_dec_proj exists."""
    text_encoder = T5Config(
        vocab_size=_text_vocab_size(),
        d_model=32,
        # heads * d_kv (64) != d_model (32) on purpose: catches code assuming they match.
        num_heads=4,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    audio_encoder = _encodec_config(hidden_size=16, num_filters=4, codebook_size=64)
    return _musicgen_config(
        text_encoder,
        audio_encoder,
        hidden=64,
        layers=decoder_layers,
        heads=4,  # head_dim 16: the smallest tile Triton's tl.dot accepts
        ffn=128,
        max_positions=512,
        stereo=stereo,
    )


def real_config(size: str, *, stereo: bool = False) -> MusicgenConfig:
    """The published musicgen-{small,medium,large} architecture (t5-base text encoder)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    hidden, layers, heads, ffn = SIZES[size]
    text_encoder = T5Config(
        vocab_size=32128,
        d_model=768,
        d_kv=64,
        d_ff=3072,
        num_layers=12,
        num_heads=12,
        relative_attention_num_buckets=32,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    audio_encoder = _encodec_config(hidden_size=128, num_filters=64, codebook_size=2048)
    return _musicgen_config(
        text_encoder,
        audio_encoder,
        hidden=hidden,
        layers=layers,
        heads=heads,
        ffn=ffn,
        max_positions=2048,
        stereo=stereo,
    )


def generation_config(config: MusicgenConfig, *, top_k: int, max_length: int) -> GenerationConfig:
    """Sampling defaults of the published checkpoints (CFG scale 3, top-k sampling)."""
    special_id = config.decoder.vocab_size
    return GenerationConfig(
        do_sample=True,
        guidance_scale=3.0,
        top_k=top_k,
        max_length=max_length,
        pad_token_id=special_id,
        bos_token_id=special_id,
        decoder_start_token_id=special_id,
    )


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _prepare_dir(path: str | pathlib.Path, overwrite: bool) -> pathlib.Path:
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    existing = sorted({p for pattern in _CHECKPOINT_GLOBS for p in path.glob(pattern)})
    if existing and not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint; pass overwrite=True to replace it")
    # Only our own files are removed: a stale shard from an earlier, differently sharded build
    # would otherwise be picked up by loaders globbing model*.safetensors.
    for stale in existing:
        stale.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save(
    path: pathlib.Path,
    model: MusicgenForConditionalGeneration,
    generation: GenerationConfig,
    max_shard_size: int | str | None,
) -> None:
    model.generation_config = generation
    # None means one file; transformers has no "unsharded" switch, so use a size nothing reaches.
    shard_size = "10000GB" if max_shard_size is None else max_shard_size
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard_size)
    save_tokenizer(path)
    # Lets AutoProcessor / MusicgenProcessor load the folder, as with the hub checkpoints.
    channels = model.config.decoder.audio_channels
    EncodecFeatureExtractor(
        feature_size=channels, sampling_rate=SAMPLING_RATE, padding_value=0.0
    ).save_pretrained(path)


def build_tiny_checkpoint(
    path: str | pathlib.Path, *, stereo: bool = False, seed: int = 0, overwrite: bool = False,
    decoder_layers: int = 2,
) -> pathlib.Path:
    """Writes a test-sized MusicGen checkpoint to ``path`` and returns the folder.

    The same seed gives identical weights (and, with the same library versions,
    identical files). Mono uses 4 codebooks; stereo uses 8 interleaved
    codebooks (left, right, left, ...) decoded by a mono EnCodec, like
    musicgen-stereo. ``decoder_layers``: 24 gives musicgen-small's structure at a tiny width (for counts that
    depend on structure, not width).
    """
    path = _prepare_dir(path, overwrite)
    with quiet_token_id_warnings():  # transformers' harmless pad/bos warnings about every MusicgenConfig
        config = tiny_config(stereo=stereo, decoder_layers=decoder_layers)
        with _seeded(seed, torch.float32):
            model = MusicgenForConditionalGeneration(config)
        generator = torch.Generator().manual_seed(seed)
        _reinit_decoder(model, generator)
        _reinit_codec(model.audio_encoder, generator)
        _init_codebooks(model.audio_encoder, generator)
        _save(path, model.eval(), generation_config(config, top_k=50, max_length=256), None)
    return path


def build_checkpoint(
    path: str | pathlib.Path,
    *,
    size: str,
    stereo: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a real-size MusicGen (random weights) for benchmarks.

    Parameters are created directly in ``dtype`` and safetensors streams them
    to disk, so peak memory is about the checkpoint size: float32 / bfloat16
    small 2.4 / 1.2 GB, medium 8.0 / 4.0 GB, large 13.7 / 6.9 GB (large in
    float32 peaked at 13.9 GB RSS and took ~2 min on 2 cores). Weights use
    transformers' default init (speed matters more than logit margins here);
    codebooks, which transformers leaves at zero, are random normal.
    """
    path = _prepare_dir(path, overwrite)
    with quiet_token_id_warnings():
        config = real_config(size, stereo=stereo)
        with _seeded(seed, dtype):
            model = MusicgenForConditionalGeneration(config)
        _fill_zero_codebooks(model.audio_encoder, torch.Generator().manual_seed(seed))
        _save(path, model.eval(), generation_config(config, top_k=250, max_length=1500), max_shard_size)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastgen.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--stereo", action="store_true")
    parser.add_argument("--size", choices=["tiny", *SIZES], default="tiny")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="real sizes only (the tiny model is always float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default=None, help='e.g. "2GB"; default one file')
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.size == "tiny":
        out = build_tiny_checkpoint(args.out_dir, stereo=args.stereo, seed=args.seed, overwrite=args.overwrite)
    else:
        out = build_checkpoint(
            args.out_dir,
            size=args.size,
            stereo=args.stereo,
            seed=args.seed,
            dtype=getattr(torch, args.dtype),
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
    print(out)


if __name__ == "__main__":
    main()
