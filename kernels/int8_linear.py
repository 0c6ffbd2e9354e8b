"""Weight-only int8 linear at decode shapes: out[m, n] = (Σ_k x[m, k] · q[n, k]) · scale[n].

q is an int8 [N, K] weight with one symmetric scale per output channel (fastgen.model.quantize); x is fp32, fp16 or
bf16 with few rows (2 per request under classifier-free guidance). A decode step is bound by streaming the weights,
so int8 halves its bytes against bf16: each weight byte is loaded once per row block and widened in registers.
Floor: N·K bytes of weight + 4·N of scales + M·K·|x| in + M·N·|out| out.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._configs import KernelConfig, make_config


def int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float, q [N, K] int8, scale [N] float → [M, N] in x's dtype (fp32 accumulate)."""
    return ((x.float() @ q.float().t()) * scale.float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: one program per (BLOCK_M rows, BLOCK_N output channels), looping over K in BLOCK_K steps. Few rows:
# the product is a broadcast multiply summed over K (tl.dot needs 16 rows); 16 rows or more (prefill, big batches):
# the int8 tile is widened to x's dtype and fed to tl.dot. Narrow N tiles give a GEMV enough programs to fill the
# GPU (1024 channels / 8 = 128 programs at M = 2). The per-channel scale is applied once, after the reduction.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _int8_linear_kernel(
    x_ptr,        # [M, K] float, last dim contiguous
    q_ptr,        # [N, K] int8, last dim contiguous
    scale_ptr,    # [N] float32
    out_ptr,      # [M, N], last dim contiguous
    M,
    N,
    K,
    stride_x,
    stride_q,
    stride_out,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x      # [BLOCK_M, 1]
    q_rows = q_ptr + cols.to(tl.int64)[:, None] * stride_q      # [BLOCK_N, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)   # [BLOCK_M, BLOCK_K]
        w = tl.load(q_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)     # [BLOCK_N, BLOCK_K]
        if USE_DOT:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), out_dtype=tl.float32, input_precision="ieee")
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    out = (acc * scale[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], out,
             mask=row_ok[:, None] & col_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, num_warps) by rows: broadcast tiles hold ≤ 8192 products (64 per thread at
# 4 warps); 16 rows and up go through tl.dot
_ROW_BUCKETS = ((1, (1, 16, 256, False, 4)), (2, (2, 8, 256, False, 4)), (4, (4, 8, 128, False, 4)),
                (8, (8, 8, 64, False, 4)))
_DOT_CONFIG = (16, 64, 64, True, 4)
_DOT_CONFIG_FP32 = (16, 32, 32, True, 4)  # fp32 operands (no tensor cores) spill at 64 × 64


def launch_config(rows: int, dtype: torch.dtype) -> tuple[int, int, int, bool, int]:
    for limit, config in _ROW_BUCKETS:
        if rows <= limit:
            return config
    return _DOT_CONFIG_FP32 if dtype == torch.float32 else _DOT_CONFIG


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x [M, K] float, q [N, K] int8, scale [N] float32 → out [M, N] in x's dtype (written in place when given)."""
    assert x.dim() == 2 and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and x.stride(1) == 1, \
        f"x must be float [M, K] with a contiguous last dim, got {x.dtype} {tuple(x.shape)}"
    rows, k = x.shape
    assert q.dtype == torch.int8 and q.dim() == 2 and q.shape[1] == k and q.stride(1) == 1, \
        f"q must be int8 [N, {k}] with a contiguous last dim, got {q.dtype} {tuple(q.shape)}"
    n = q.shape[0]
    assert scale.dtype == torch.float32 and scale.shape == (n,) and scale.stride(0) == 1, \
        f"scale must be float32 [{n}], got {scale.dtype} {tuple(scale.shape)}"
    if out is None:
        out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    assert out.shape == (rows, n) and out.dtype == x.dtype and out.stride(1) == 1, \
        f"out must be {x.dtype} [{rows}, {n}] with a contiguous last dim"
    devices = {t.device for t in (x, q, scale, out)}
    assert len(devices) == 1, f"all tensors must be on one device, got {devices}"
    if rows == 0:
        return out
    block_m, block_n, block_k, use_dot, warps = launch_config(rows, x.dtype)
    grid = (triton.cdiv(n, block_n), triton.cdiv(rows, block_m))
    _int8_linear_kernel[grid](x, q, scale, out, rows, n, k, x.stride(0), q.stride(0), out.stride(0),
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot,
                              num_warps=warps)
    return out


def _engine_configs() -> list[KernelConfig]:
    """Every row bucket in every activation dtype, as the JIT specialises them: M = 1 becomes a constexpr, and the
    musicgen widths (1024 … 8192) are multiples of 16."""
    configs = []
    # the one-row bucket only ever sees M = 1, which the JIT turns into a constexpr; the others never do
    for dtype in ("bf16", "fp16", "fp32"):
        dot = _DOT_CONFIG_FP32 if dtype == "fp32" else _DOT_CONFIG
        buckets = [(config, limit == 1) for limit, config in _ROW_BUCKETS] + [(dot, False)]
        for (block_m, block_n, block_k, use_dot, warps), one_row in buckets:
            configs.append(make_config(
                f"int8 linear {dtype} BLOCK_M={block_m} BLOCK_N={block_n} BLOCK_K={block_k}"
                + (" dot" if use_dot else "") + (" M=1" if one_row else ""),
                _int8_linear_kernel,
                {"x_ptr": f"*{dtype}", "q_ptr": "*i8", "scale_ptr": "*fp32", "out_ptr": f"*{dtype}", "M": "i32",
                 "N": "i32", "K": "i32", "stride_x": "i32", "stride_q": "i32", "stride_out": "i32"},
                {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "USE_DOT": use_dot}
                | ({"M": 1} if one_row else {}),
                aligned=("x_ptr", "q_ptr", "scale_ptr", "out_ptr", "N", "K", "stride_x", "stride_q", "stride_out"),
                num_warps=warps, num_stages=2 if use_dot else 1))
    return configs


ENGINE_CONFIGS: list[KernelConfig] = _engine_configs()
