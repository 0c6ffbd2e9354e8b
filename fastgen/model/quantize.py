"""Quantised decoder projections and LM heads, computed at load from the checkpoint's float weights (no new file
format).

- int8 (weight-only): each output channel (row of a [N, K] weight) gets its own scale, amax(|row|) / 127, and the
  weight is stored as round(W / scale) in [-127, 127]. Activations stay in the model's dtype; the product is
  rescaled per output channel (y = (x @ q^T) * scale), so a step streams one byte per weight instead of two (bf16)
  or four (fp32).
- int4 (weight-only, CPU): each group of INT4_GROUP_SIZE consecutive weights of a row gets its own scale and
  offset (asymmetric: the group's min and max map to codes 0 and 15), half a byte per weight. About ten times
  int8's rounding error per projection (a group's 16 levels against a row's 255); measured by
  bench/quant_deviation.py."""
from __future__ import annotations

import torch

from fastgen.config import (CPU_ONLY_QUANTIZATIONS, FUSED_KERNEL_QUANTIZATIONS, QUANTIZATIONS,  # noqa: F401
                            validate_quantization)

INT8_MAX = 127
INT4_LEVELS = 15          # codes 0..15
INT4_GROUP_SIZE = 64      # weights per scale/offset pair along K (32-128 stream at about the same speed on a CPU)


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


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float weight (K a multiple of group_size) → (codes int32 [N, K] in 0..15, scales [N, K/g],
    offsets [N, K/g], float32) with weight ≈ (codes − 8) · scale + offset per group. The offset is stored at code 8
    (mid-range) because that is how aten's int4 kernel takes it. A constant group gets scale 1 and codes 0."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 needs K divisible by the group size {group_size}, got a [{n}, {k}] weight")
    groups = weight.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / INT4_LEVELS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((groups - low.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, INT4_LEVELS)
    offset = low + 8 * scale
    return codes.to(torch.int32).reshape(n, k), scale, offset


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = codes.shape
    groups = codes.float().reshape(n, scale.shape[1], -1)
    return ((groups - 8) * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1)).reshape(n, k).to(dtype)
