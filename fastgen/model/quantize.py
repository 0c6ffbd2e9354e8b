"""Weight-only int8: per-output-channel symmetric quantisation of the decoder's projections and LM heads.

Each output channel (row of a [N, K] weight) gets its own scale, amax(|row|) / 127, and the weight is stored as
round(W / scale) in [-127, 127]. Activations stay in the model's dtype; the product is rescaled per output channel
(y = (x @ q^T) * scale), so a step streams one byte per weight instead of two (bf16) or four (fp32). Quantised at
load from the checkpoint's float weights: no new file format."""
from __future__ import annotations

import torch

# "int8": weight-only (activations stay in the model's dtype). "int8-dynamic": the same int8 weights, and each
# projection's input quantised to 8 bits on the fly (one asymmetric scale per call, fbgemm's dynamic linear): the
# integer GEMV streams the weights about twice as fast as the weight-only kernel on a CPU, at the cost of an
# activation rounding error (measured beside weight-only int8 by bench/int8_deviation.py). CPU only.
QUANTIZATIONS = (None, "int8", "int8-dynamic")
CPU_ONLY_QUANTIZATIONS = ("int8-dynamic",)
INT8_MAX = 127


def validate_quantization(quantization: str | None, device: str | None = None) -> str | None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None, 'int8' or 'int8-dynamic', got {quantization!r}")
    if quantization in CPU_ONLY_QUANTIZATIONS and device is not None and not str(device).startswith("cpu"):
        raise ValueError(f"quantization={quantization!r} runs on a CPU only (fbgemm's dynamic int8 linear); "
                         f"use quantization='int8' on {device}")
    return quantization


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight → (int8 [N, K], float32 scales [N]) with weight ≈ q * scale[:, None]. Computed in float32
    whatever the input dtype; an all-zero row gets scale 1 (its codes are 0) instead of a division by zero."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


@torch.inference_mode()
def teacher_forced_logits(decoder, text_states: torch.Tensor, text_mask: torch.Tensor, tokens: torch.Tensor
                          ) -> torch.Tensor:
    """Guided logits [T, K, V] (float32, guidance scale 3) of one request whose delayed input tokens [K, T] are
    given: every position sees the same inputs whatever the decoder predicted, so two decoders (say, float and int8)
    can be compared position by position. text_states [1, L, Dt] / text_mask [1, L] from the T5 encoder."""
    from fastgen.model.decoder import KVCache
    from fastgen.model.ops import TorchOps
    c = decoder.config
    steps = tokens.shape[1]
    device = decoder.device
    cache = KVCache.allocate(c, 1, steps, max(text_mask.shape[1], 1), decoder.dtype, device)
    rows = torch.tensor([0, 1], device=device)
    decoder.write_cross_kv(cache, rows[:1], decoder.project_text(text_states.to(device), text_mask.to(device)))
    text_length = torch.tensor([int(text_mask.sum()), 0], dtype=torch.int32, device=device)
    codebook = torch.arange(c.num_codebooks, device=device)
    ops, guided = TorchOps(), []
    for t in range(steps):
        hidden = (decoder.embed[codebook, tokens[:, t].to(device)].sum(0) + decoder.sinusoid[t]).expand(2, -1)
        position = torch.full((2,), t, dtype=torch.int64, device=device)
        ctx = ops.context(rows, position, text_length, t + 1, text_mask.shape[1], decoder.dtype)
        logits = decoder.decode(ops, hidden.contiguous(), cache, ctx).float()
        guided.append(logits[1] + 3.0 * (logits[0] - logits[1]))
    return torch.stack(guided)


def deviation(reference: torch.Tensor, quantized: torch.Tensor) -> dict[str, float]:
    """How far quantised logits [..., V] are from the reference's: relative error (max |Δ| over max |ref|, and RMS
    over RMS), KL(reference ‖ quantised) of the temperature-1 distributions (mean and max over positions), and how
    often the two argmaxes (greedy codes) agree."""
    ref, quant = reference.float(), quantized.float()
    kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - quant.log_softmax(-1))).sum(-1)
    return {"max_rel_error": float((quant - ref).abs().max() / ref.abs().max()),
            "rms_rel_error": float((quant - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "greedy_agreement": float((quant.argmax(-1) == ref.argmax(-1)).float().mean())}
