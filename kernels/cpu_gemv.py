"""Decode-shape linear on an x86 CPU with AVX-512 or AVX2: y = x @ W^T (+ residual) for a few rows (2 per request
under CFG).

A decode step streams every weight once, so a GEMV is as fast as its weight stream. oneDNN's inner product reads
its packed bf16 weights at ~0.75 of a plain sum's read rate on a 2-core AMD EPYC (musicgen-small shapes at 2 rows);
this kernel (``cpu_gemv.cpp``) reads one sequential stream per thread and keeps up with the sum. Weights are packed
once, at load, into blocks of 16 output channels: bf16 as [N/16, K/2, 16, 2] (AVX512-BF16's dot-product operand
layout), fp32 as [N/16, K, 16]. Weight-only int8 codes (fastgen.model.quantize.quantize_int8) are packed like fp32,
[N/16, K, 16], and widened to fp32 in registers against fp32 activations, the per-channel scale applied to each
result: one byte per weight streamed, where ``aten._weight_int8pack_mm`` reads its int8 weights at a third to a half
of this kernel's rate (musicgen-small, 2 rows, 2-core AMD EPYCs with AVX-512 and with AVX2 only). Floor: N·K·|w|
bytes of weight (+ 4·N of int8 scales) + M·K·|x| in + M·N·|y| out.

The C++ is built on first use (fastgen.kernels._cpu_extension) as the operator ``fastgen_cpu::gemv_linear``, which
torch.compile traces through its fake and inductor calls directly. Where it cannot be built or the CPU lacks the
instructions, ``unavailable_reason`` says why and the caller keeps its other paths.
"""
from __future__ import annotations

import torch

from ._cpu_extension import build, instruction_set_missing

BLOCK = 16  # output channels per packed block


def cpu_gemv_ref(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K], weight [N, K] (unpacked; int8 codes with their scale [N]) → x @ weight^T (· scale) (+ residual) in
    x's dtype, accumulated in fp32."""
    out = x.float() @ weight.float().t()
    if scale is not None:
        out = out * scale.float()
    if residual is not None:
        out = out + residual.float()
    return out.to(x.dtype)


def unavailable_reason(dtype: torch.dtype) -> str | None:
    """None when the kernel runs here for ``dtype`` weights (building it if needed); otherwise why not."""
    return instruction_set_missing(dtype) or build()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] → the kernel's layout (see the module docstring). N must be a multiple of 16, and K even for bf16;
    float32 and int8 take any K."""
    n, k = weight.shape
    if n % BLOCK or (weight.dtype == torch.bfloat16 and k % 2):
        raise ValueError(f"cpu_gemv packs [N, K] weights with N a multiple of {BLOCK} (and K even for bfloat16), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype == torch.bfloat16:
        return weight.reshape(n // BLOCK, BLOCK, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return weight.reshape(n // BLOCK, BLOCK, k).permute(0, 2, 1).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The [N, K] weight back from ``pack``'s layout."""
    if packed.dim() == 4:  # bf16 [N/16, K/2, 16, 2]; fp32 and int8 [N/16, K, 16]
        blocks, pairs = packed.shape[:2]
        return packed.permute(0, 2, 1, 3).reshape(blocks * BLOCK, pairs * 2)
    blocks, k = packed.shape[:2]
    return packed.permute(0, 2, 1).reshape(blocks * BLOCK, k)


def cpu_gemv(x: torch.Tensor, packed: torch.Tensor, out_features: int, residual: torch.Tensor | None = None,
             scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W^T (· scale [N], for int8 codes) (+ residual [M, N]) → [M, N] in x's dtype; ``packed`` from
    ``pack``. The caller has checked ``unavailable_reason`` once."""
    return torch.ops.fastgen_cpu.gemv_linear(x, packed, out_features, residual, scale)
