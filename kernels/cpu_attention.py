"""Single-query attention over the KV cache on an x86 CPU with AVX-512: the decode step's attention, one new query
per row, against a strided view of the cache (``cpu_attention.cpp``).

Under torch.compile inductor runs this as two batched matmuls around its softmax loop; at long spans those read the
cache well below the memory bandwidth (musicgen-small at position 1500 on a 2-core AMD EPYC: ~12 ms of a 25 ms bf16
step outside the projections, for 302 MB of K/V), after gathering the batch's rows. The kernel reads each (row,
head)'s keys and values once, in order, in place in the layer's cache, and keeps the scores in a buffer between its
passes; softmax and accumulation are in fp32. Floor: the K/V
bytes read, R·H·span·Dh·|kv|·2.

Built with the other CPU kernels (fastgen.kernels._cpu_extension) as ``fastgen_cpu::decode_attention``.
"""
from __future__ import annotations

import torch

from ._cpu_extension import build, instruction_set_missing


def cpu_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_rows: torch.Tensor,
                      span: int, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """q [R, H, Dh] against the first ``span`` positions of cache rows ``cache_rows`` [R] of k_cache / v_cache
    [rows, H, positions, Dh], with an additive bias [R, 1, 1, span] → [R, H, Dh] in q's dtype, computed in fp32."""
    keys, values = k_cache[cache_rows, :, :span].float(), v_cache[cache_rows, :, :span].float()
    scores = torch.matmul(q.float().unsqueeze(2) * scale, keys.transpose(-1, -2)) + bias.float()
    return torch.matmul(scores.softmax(-1), values).squeeze(2).to(q.dtype)


def unavailable_reason(dtype: torch.dtype, head_dim: int) -> str | None:
    """None when the kernel runs here for a ``dtype`` cache and heads of ``head_dim`` (building it if needed)."""
    if head_dim % 16 or head_dim > 128:
        return f"head size {head_dim}: the kernel takes multiples of 16 up to 128"
    return instruction_set_missing(dtype) or build()


def cpu_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_rows: torch.Tensor,
                  span: int, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """As ``cpu_attention_ref``, reading the rows in place (no gather). The caller has checked
    ``unavailable_reason`` once."""
    return torch.ops.fastgen_cpu.decode_attention(q, k_cache, v_cache, cache_rows, span, bias, scale)
