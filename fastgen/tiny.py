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
import contextlib
import json
import math
import pathlib
from collections.abc import Iterator, Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
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

SAMPLING_RATE = 32_000
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
# Tokenizer
# ---------------------------------------------------------------------------

# T5's special tokens at T5's ids, so pad=0 / eos=1 / unk=2 mean the same thing as in t5-base.
_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
# SentencePiece's word-boundary marker, as in T5's tokenizer.
_SPACE = "\u2581"
_WORDS = tuple(
    """
    a an and the of with in for to on by from
    music song beat loop track melody rhythm bass drums drum guitar piano synth violin strings
    vocals choir flute horn pop rock jazz blues techno house ambient classical folk metal hip hop
    lofi disco funk reggae orchestral electronic happy sad calm dark bright slow fast heavy soft
    loud epic chill upbeat dreamy energetic acoustic groovy warm 80s 90s bpm solo intro
    """.split()
)
_CHARACTERS = tuple("abcdefghijklmnopqrstuvwxyz0123456789") + tuple(".,!?'\"-:;()&/+#%")
# Unigram log-probabilities: whole words beat spelling them out letter by letter.
_WORD_SCORE = -3.0
_MARKER_SCORE = -4.0
_CHAR_SCORE = -6.0
TOKENIZER_MAX_LENGTH = 512


def _tokenizer_vocab() -> list[tuple[str, float]]:
    vocab = [(token, 0.0) for token in _SPECIAL_TOKENS]
    vocab.append((_SPACE, _MARKER_SCORE))
    vocab += [(_SPACE + word, _WORD_SCORE) for word in _WORDS]
    vocab += [(char, _CHAR_SCORE) for char in _CHARACTERS]
    return vocab


def build_tokenizer() -> Tokenizer:
    """A T5-like Unigram tokenizer over a small fixed vocabulary.

    Unigram + Metaspace mirrors how T5's SentencePiece tokenizer splits text, so
    unknown words fall back to single characters and anything left (emoji,
    scripts outside the vocabulary) becomes ``<unk>`` rather than an error.
    """
    tokenizer = Tokenizer(Unigram(_tokenizer_vocab(), unk_id=_SPECIAL_TOKENS.index("<unk>")))
    # NFKD + StripAccents maps "é" to "e", so accented prompts keep their letters; whitespace
    # runs collapse and ends are stripped, as T5's SentencePiece normaliser does.
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFKD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="always")
    # T5 appends </s> to every sequence; MusicGen's text encoder was trained that way.
    eos_id = _SPECIAL_TOKENS.index("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    tokenizer.add_special_tokens(list(_SPECIAL_TOKENS))
    return tokenizer


def _text_vocab_size() -> int:
    # Round up to a multiple of 8, as T5 itself pads its embedding table.
    return 8 * math.ceil(len(_tokenizer_vocab()) / 8)


def save_tokenizer(path: pathlib.Path) -> None:
    """Writes tokenizer.json plus the config files AutoTokenizer needs offline."""
    build_tokenizer().save(str(path / "tokenizer.json"))
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    # PreTrainedTokenizerFast only wraps tokenizer.json, so no sentencepiece model file is needed.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": TOKENIZER_MAX_LENGTH,
        "padding_side": "right",
        **special,
    }
    _write_json(path / "tokenizer_config.json", config)
    _write_json(path / "special_tokens_map.json", special)


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
# Weight initialisation
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int, dtype: torch.dtype) -> Iterator[None]:
    """Seeds transformers' default init and sets the parameter dtype, restoring both after."""
    previous_dtype = torch.get_default_dtype()
    # fork_rng keeps the caller's global RNG stream untouched by our seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous_dtype)


def _normal_(tensor: torch.Tensor, std: float, generator: torch.Generator, mean: float = 0.0) -> None:
    # Sample in float32 then cast, so values do not depend on the storage dtype's RNG path.
    values = torch.randn(tensor.shape, generator=generator) * std + mean
    tensor.copy_(values)


@torch.no_grad()
def _reinit_decoder(model: MusicgenForConditionalGeneration, generator: torch.Generator) -> None:
    """Replaces the decoder's std-0.02 init with fan-in scaled weights.

    With std 0.02 every logit is almost the same, so greedy argmax flips on
    rounding noise and kernel-vs-reference tests become flaky. Fan-in scaling
    keeps activations O(1); the lm heads get gain 3 (logit std ~3), so the
    median top-1/top-2 margin is ~0.8 logits.
    """
    for name, module in model.decoder.named_modules():
        if isinstance(module, torch.nn.Embedding):
            _normal_(module.weight, 1.0, generator)
        elif isinstance(module, torch.nn.Linear):
            gain = 3.0 if name.startswith("lm_heads") else 1.0
            _normal_(module.weight, gain / math.sqrt(module.in_features), generator)
            if module.bias is not None:
                _normal_(module.bias, 0.02, generator)
        elif isinstance(module, torch.nn.LayerNorm):
            _normal_(module.weight, 0.1, generator, mean=1.0)
            _normal_(module.bias, 0.05, generator)
    projection = model.enc_to_dec_proj
    _normal_(projection.weight, 1.0 / math.sqrt(projection.in_features), generator)
    _normal_(projection.bias, 0.02, generator)


@torch.no_grad()
def _reinit_codec(codec: torch.nn.Module, generator: torch.Generator, gain: float = 1.0) -> None:
    """Gives EnCodec's weight-normed convolutions a fan-in scale and non-zero biases.

    transformers' kaiming init writes to the computed ``weight`` of the
    weight-norm parametrization, not to its stored ``original0/original1``, so
    the saved convs keep PyTorch's default scale (~0.6 gain each). Over ~15
    layers the codes' signal then shrinks ~1000x below the conv biases and the
    decoded audio barely depends on the codes.
    """
    for module in codec.modules():
        if isinstance(module, torch.nn.LSTM):
            # Zero by default; random values make a dropped bias visible in tests.
            for name, parameter in module.named_parameters():
                if name.startswith("bias"):
                    _normal_(parameter, 0.05, generator)
        if not isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            continue
        weight_norm = module.parametrizations.weight
        direction = weight_norm.original1  # the "v" of weight norm; only its direction matters
        _normal_(direction, 1.0, generator)
        # The magnitude g is a per-channel norm along dim 0, so choose it to hit gain / sqrt(fan_in).
        if isinstance(module, torch.nn.ConvTranspose1d):
            # weight [in, out, k]: each output sample sums in * k / stride taps.
            in_channels, out_channels, _ = direction.shape
            magnitude = gain * math.sqrt(out_channels * module.stride[0] / in_channels)
        else:
            magnitude = gain
        weight_norm.original0.fill_(magnitude)
        if module.bias is not None:
            _normal_(module.bias, 0.02, generator)
    # Quiet the output conv: decoded audio then has std ~0.15 and rarely clips when written as PCM.
    codec.decoder.layers[-1].conv.parametrizations.weight.original0.mul_(0.25)


def _calibration_audio(seconds: float, generator: torch.Generator) -> torch.Tensor:
    """Noise plus a few swept tones: a varied signal to place codebook entries on."""
    num_samples = int(seconds * SAMPLING_RATE)
    time = torch.arange(num_samples, dtype=torch.float32) / SAMPLING_RATE
    noise = 0.1 * torch.randn(num_samples, generator=generator)
    tones = sum(
        0.2 * torch.sin(2 * math.pi * (f0 + 200.0 * time) * time)
        for f0 in (110.0, 440.0, 1760.0)
    )
    return (noise + tones).reshape(1, 1, num_samples)


@torch.no_grad()
def _init_codebooks(codec: torch.nn.Module, generator: torch.Generator, seconds: float = 4.0) -> None:
    """Places each residual codebook on encoder outputs of a calibration signal.

    transformers initialises EnCodec codebooks to zeros (real weights overwrite
    them), which makes every code 0 and decoded audio constant. Seeding them
    from actual latents, layer by layer on the residual (EnCodec's own k-means
    init does the same), gives varied codes in every codebook and decodable
    audio with a sensible scale.
    """
    latents = codec.encoder(_calibration_audio(seconds, generator))
    residual = latents[0].transpose(0, 1)  # [frames, codebook_dim]
    for layer in codec.quantizer.layers:
        codebook = layer.codebook
        size = codebook.embed.shape[0]
        # Sample with replacement when there are fewer frames than entries; jitter keeps duplicates distinct.
        picks = torch.randint(residual.shape[0], (size,), generator=generator)
        jitter = 0.05 * residual.std() * torch.randn(codebook.embed.shape, generator=generator)
        embed = residual[picks] + jitter
        codebook.embed.copy_(embed)
        codebook.embed_avg.copy_(embed)
        codebook.cluster_size.fill_(1.0)
        residual = residual - codebook.decode(codebook.encode(residual))


@torch.no_grad()
def _fill_zero_codebooks(codec: torch.nn.Module, generator: torch.Generator) -> None:
    """Cheap random codebooks for the real-size builder: no encoder pass, never all zeros."""
    for layer in codec.quantizer.layers:
        codebook = layer.codebook
        _normal_(codebook.embed, 1.0, generator)
        codebook.embed_avg.copy_(codebook.embed)
        codebook.cluster_size.fill_(1.0)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
