"""The weights of random checkpoints that behave like trained ones where the tests need it: fan-in scaled decoder
weights (distinct logits, so greedy decoding is stable), a codec whose output is audible, and EnCodec codebooks
calibrated on test audio."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from transformers import MusicgenForConditionalGeneration

SAMPLING_RATE = 32_000  # EnCodec 32 kHz, as MusicGen's



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
