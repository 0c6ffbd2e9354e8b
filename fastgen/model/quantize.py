"""Weight-only int8: per-output-channel symmetric quantisation of the decoder's projections and LM heads.

Each output channel (row of a [N, K] weight) gets its own scale, amax(|row|) / 127, and the weight is stored as
round(W / scale) in [-127, 127]. Activations stay in the model's dtype; the product is rescaled per output channel
(y = (x @ q^T) * scale), so a step streams one byte per weight instead of two (bf16) or four (fp32). Quantised at
load from the checkpoint's float weights: no new file format."""
from __future__ import annotations

import torch

QUANTIZATIONS = (None, "int8")
INT8_MAX = 127


def validate_quantization(quantization: str | None) -> str | None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None or 'int8', got {quantization!r}")
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
