"""The decoder's projections at decode shapes, each one launch: out = epilogue(prologue(x) @ Wᵀ).

    prologue (optional): LayerNorm of each row of x, statistics in fp32 inside the kernel (QKV, cross-Q, FC1, and
                         the final norm in front of the LM heads);
    epilogue (optional): · scale[n] (weight-only int8), then an activation (exact GELU for musicgen's FC1; tanh GELU,
                         ReLU, SiLU), then either a store in the output dtype (fp32 logits for the LM heads) or, with
                         ``accumulate``, out += result in place (the residual of self-out, cross-out, FC2).

x [M, K] and W [N, K] in bf16 / fp16 / fp32, or W int8 with per-output-channel fp32 scales. Floor: N·K·|W| bytes of
weight (+ 4·N of scales), M·K·|x| in, M·N·|out| out (twice with ``accumulate``), + 2·K·|x| of norm weights; at
M = 2 the weight is everything (musicgen-small QKV, bf16: 6 MiB, ~1.3 µs at 4.8 TB/s).

**Batch invariance by construction.** The tile configuration (BLOCK_M, BLOCK_N, BLOCK_K, split-K, warps, stages)
is a function of (N, K, weight dtype) only — never of M: rows are always tiled 16 at a time (the grid grows with
M), and each output element is the same chain of tl.dot steps over the same K chunks, summed over the same splits in
the same order. A row's result is therefore bitwise the same whatever its batch-mates (tests/test_batch_invariance.py).
The price: at M = 2, 14 of the 16 tile rows are padding (free: a decode projection is bound by the weight stream,
not by tensor-core work), and at large M the kernel keeps its narrow tiles where cuBLAS would widen them (each
weight tile is read once per 16 rows, mostly from L2): expect it to lose to cuBLAS past a few hundred rows.

**Filling the GPU at M = 2**: K is split into a fixed number of parts (by the weight shape), partial tiles go to
scratch and the program that draws the last ticket of a tile sums them in split order; docs/kernels.md has the
arithmetic and the programs per musicgen shape.

The scratch (partials and tickets) is one pair of buffers per device, grown on demand outside CUDA-graph capture
(the engine's eager warm-up of every bucket grows it) and passed to the op as mutable arguments, so a captured
graph keeps the pointers it was given. No host syncs; the grid comes from host-known sizes; M is never
specialised by the JIT, so every batch size runs the same binary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._configs import KernelConfig, make_config
from ._library import define_kernel_op
from ._scratch import ReductionScratch

BLOCK_M = 16            # rows per program, whatever M is (tl.dot's smallest tile)
TARGET_PROGRAMS = 132   # SMs of an H100 / H200 (an A100's 108 are covered too)
MAX_SPLIT_K = 8
ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu", "silu")


def fused_linear_ref(
    x: torch.Tensor,                  # [M, K] float
    weight: torch.Tensor,             # [N, K] float (x's dtype) or int8
    scale: torch.Tensor | None = None,  # [N] float32, with an int8 weight
    norm: tuple[torch.Tensor, torch.Tensor] | None = None,  # LayerNorm (weight [K], bias [K]) applied to x first
    eps: float = 1e-5,
    activation: str = "none",
    out: torch.Tensor | None = None,  # [M, N]; with accumulate, out += result
    accumulate: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """What the kernel computes, in PyTorch: the LayerNorm in fp32 rounded to x's dtype (the GEMM's input), the
    product accumulated in fp32, the epilogue in fp32, one rounding into the output."""
    if norm is not None:
        x = F.layer_norm(x.float(), (x.shape[1],), norm[0].float(), norm[1].float(), eps).to(x.dtype)
    w = weight.float() if weight.dtype == torch.int8 else weight
    result = x.float() @ w.float().t()
    if scale is not None:
        result = result * scale.float()
    result = _activate(result, activation)
    if accumulate:
        out.copy_((out.float() + result).to(out.dtype))
        return out
    result = result.to(out_dtype or (out.dtype if out is not None else x.dtype))
    if out is None:
        return result
    out.copy_(result)
    return out


def _activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "relu":
        return F.relu(y)
    if activation == "silu":
        return F.silu(y)
    return y


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: grid (N tiles × split_k, M tiles). Program (t·split_k + s, m) computes rows m·16 … m·16+15, columns
# t·BLOCK_N …, over K chunks [s·k_per_split, (s+1)·k_per_split).
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _epilogue(acc, cols, col_ok, scale_ptr, ACTIVATION: tl.constexpr, INT8: tl.constexpr):
    if INT8:
        acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if ACTIVATION == "gelu":
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))  # exact: x·Φ(x), 1/√2
    elif ACTIVATION == "gelu_tanh":  # 0.5·(1 + tanh(z)) = sigmoid(2z), z = √(2/π)·(x + 0.044715·x³)
        acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
    elif ACTIVATION == "relu":
        acc = tl.maximum(acc, 0.0)
    elif ACTIVATION == "silu":
        acc = acc * tl.sigmoid(acc)
    return acc


# M is never specialised (the JIT would compile other binaries for M = 1 and M % 16 == 0): one binary for every
# batch size, so not even instruction selection can differ between a row's batches. The split count is a runtime
# argument (not specialised either): one binary per (dtype, variant) serves every weight shape.
@triton.jit(do_not_specialize=["M", "split_k"])
def _fused_linear_kernel(
    out_ptr,          # [M, N], last dim contiguous (read first with ACCUMULATE)
    partial_ptr,      # fp32 [split_k, M, N] split partials (touched only when split_k > 1)
    ticket_ptr,       # int32 [M tiles · N tiles] arrival counters, 0 between launches
    x_ptr,            # [M, K], last dim contiguous
    w_ptr,            # [N, K], last dim contiguous: x's dtype, or int8
    scale_ptr,        # [N] fp32 per-channel scales (read only when INT8)
    norm_w_ptr,       # [K] LayerNorm weight (read only when NORM)
    norm_b_ptr,       # [K] LayerNorm bias
    M,
    N,
    K,
    split_k,          # parts K is split into (1: no split-K, no scratch)
    k_per_split,      # a multiple of BLOCK_K
    stride_x,
    stride_w,
    stride_out,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    INT8: tl.constexpr,
):
    tile_n = tl.program_id(0) // split_k
    split = tl.program_id(0) % split_k
    tile_m = tl.program_id(1)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x      # [BLOCK_M, 1]
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w      # [BLOCK_N, 1]

    if NORM:  # row statistics over all of K, two passes (mean, then the centred variance) as F.layer_norm does
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
            row_sum += tl.sum(x.to(tl.float32), axis=1)
        mean = row_sum / K
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (ks < K)[None, :]
            x = tl.load(x_rows + ks[None, :], mask=ok, other=0.0)
            centred = tl.where(ok, x.to(tl.float32) - mean[:, None], 0.0)
            squares += tl.sum(centred * centred, axis=1)
        rstd = 1.0 / tl.sqrt(squares / K + eps)

    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)   # [BLOCK_M, BLOCK_K]
        if NORM:
            gamma = tl.load(norm_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            beta = tl.load(norm_b_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            normed = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
            x = tl.where(row_ok[:, None] & k_ok[None, :], normed, 0.0).to(x_ptr.dtype.element_ty)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)   # [BLOCK_N, BLOCK_K]
        if INT8:
            w = w.to(x_ptr.dtype.element_ty)
        acc += tl.dot(x, tl.trans(w), out_dtype=tl.float32, input_precision="ieee")

    out_offsets = rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if split_k == 1:
        result = _epilogue(acc, cols, col_ok, scale_ptr, ACTIVATION, INT8)
        if ACCUMULATE:
            result += tl.load(out_ptr + out_offsets, mask=out_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_offsets, result.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(partial_ptr + (split * M + rows).to(tl.int64)[:, None] * N + cols[None, :], acc, mask=out_ok)
        tl.debug_barrier()  # every thread's partial is stored before the ticket (release) is taken
        ticket_index = tile_m * tl.cdiv(N, BLOCK_N) + tile_n
        ticket = tl.atomic_add(ticket_ptr + ticket_index, 1, sem="acq_rel", scope="gpu")
        if ticket == split_k - 1:  # the last to arrive: all partials are visible (acquire); sum them in split order
            summed = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(split_k):
                summed += tl.load(partial_ptr + (s * M + rows).to(tl.int64)[:, None] * N + cols[None, :],
                                 mask=out_ok, other=0.0, cache_modifier=".cg")
            result = _epilogue(summed, cols, col_ok, scale_ptr, ACTIVATION, INT8)
            if ACCUMULATE:
                result += tl.load(out_ptr + out_offsets, mask=out_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + out_offsets, result.to(out_ptr.dtype.element_ty), mask=out_ok)
            tl.atomic_xchg(ticket_ptr + ticket_index, 0)  # ready for the next launch


# ----------------------------------------------------------------------------------------------------------------
# Configuration: a function of (N, K, weight dtype) only
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LinearConfig:
    block_n: int
    block_k: int
    split_k: int
    k_per_split: int
    num_warps: int
    num_stages: int
    block_m: int = BLOCK_M


def launch_config(n: int, k: int, weight_dtype: torch.dtype) -> LinearConfig:
    """Tiles and split for an [N, K] weight: 16-bit and int8 weights in 128-wide K chunks (256-byte rows of a 16-bit
    weight per load), fp32 in 64-wide ones (the same bytes per row; no tensor cores, and the wider tile would double
    the fp32 registers and shared memory)."""
    block_n = 32
    block_k = 64 if weight_dtype == torch.float32 else 128
    tiles = triton.cdiv(n, block_n)
    chunks = triton.cdiv(k, block_k)
    split = 1
    while tiles * split < TARGET_PROGRAMS and split < MAX_SPLIT_K and chunks >= 4 * split:
        split *= 2
    k_per_split = triton.cdiv(chunks, split) * block_k
    return LinearConfig(block_n, block_k, split, k_per_split, num_warps=4, num_stages=3)


# ----------------------------------------------------------------------------------------------------------------
# Scratch: split-K partials (fp32) and tickets (int32, zeroed) per device (kernels/_scratch.py)
# ----------------------------------------------------------------------------------------------------------------
_SCRATCH = ReductionScratch("fused_linear", "reserve_fused_linear_scratch()")


def _scratch_sizes(m: int, n: int, config: LinearConfig) -> tuple[int, int]:
    if config.split_k == 1:
        return 1, 1
    return config.split_k * m * n, triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)


def reserve_fused_linear_scratch(rows: int, weights: list[tuple[int, int, torch.dtype]],
                                 device: torch.device | str) -> None:
    """Allocate split-K scratch for ``rows`` rows and every (N, K, weight dtype) in ``weights``, once (call before
    CUDA-graph capture: growing it during capture is refused)."""
    sizes = [_scratch_sizes(rows, n, launch_config(n, k, dtype)) for n, k, dtype in weights]
    _SCRATCH.get(device, max(p for p, _ in sizes), max(t for _, t in sizes))


# ----------------------------------------------------------------------------------------------------------------
# Launcher and op
# ----------------------------------------------------------------------------------------------------------------
def _run_kernel(x, weight, scale, norm_weight, norm_bias, eps: float, activation: str, accumulate: bool, out,
                partials, tickets) -> None:
    m, k = x.shape
    n = weight.shape[0]
    config = launch_config(n, k, weight.dtype)
    placeholder = x  # pointers never read: scale without INT8, norm without NORM
    grid = (triton.cdiv(n, config.block_n) * config.split_k, triton.cdiv(m, config.block_m))
    _fused_linear_kernel[grid](
        out, partials, tickets, x, weight, placeholder if scale is None else scale,
        placeholder if norm_weight is None else norm_weight, placeholder if norm_bias is None else norm_bias,
        m, n, k, config.split_k, config.k_per_split, x.stride(0), weight.stride(0), out.stride(0), eps,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        NORM=norm_weight is not None, ACTIVATION=activation, ACCUMULATE=accumulate,
        INT8=weight.dtype == torch.int8, num_warps=config.num_warps, num_stages=config.num_stages,
    )


_fused_linear_op = define_kernel_op(
    "fused_linear(Tensor x, Tensor weight, Tensor? scale, Tensor? norm_weight, Tensor? norm_bias, float eps, "
    "str activation, bool accumulate, Tensor(a!) out, Tensor(b!) partials, Tensor(c!) tickets) -> ()",
    _run_kernel)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, weight, scale, norm, activation, out, accumulate) -> None:
    if not (isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype in FLOAT_DTYPES and x.stride(1) == 1):
        raise ValueError(f"x must be a float32/float16/bfloat16 [M, K] tensor with a contiguous last dim, got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    m, k = x.shape
    if not (weight.dim() == 2 and weight.shape[1] == k and weight.stride(1) == 1
            and weight.dtype in (x.dtype, torch.int8)):
        raise ValueError(f"weight must be [N, {k}] in x's dtype ({x.dtype}) or int8, with a contiguous last dim, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    n = weight.shape[0]
    if (weight.dtype == torch.int8) != (scale is not None):
        raise ValueError("scale must be given exactly when the weight is int8")
    if scale is not None and not (scale.dtype == torch.float32 and scale.shape == (n,) and scale.stride(0) == 1):
        raise ValueError(f"scale must be a contiguous float32 [{n}] tensor, got {scale.dtype} {tuple(scale.shape)}")
    if norm is not None:
        if len(norm) != 2 or any(t.shape != (k,) or t.stride(0) != 1 or not t.dtype.is_floating_point
                                 for t in norm):
            raise ValueError(f"norm must be a (weight, bias) pair of contiguous float [{k}] tensors")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if accumulate and out is None:
        raise ValueError("accumulate=True adds into out: pass out")
    if out is not None and not (out.shape == (m, n) and out.dtype in FLOAT_DTYPES and out.stride(1) == 1):
        raise ValueError(f"out must be a float [{m}, {n}] tensor with a contiguous last dim, got {out.dtype} "
                         f"{tuple(out.shape)} strides {out.stride()}")
    tensors = [x, weight, out, scale, *(norm or ())]
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def fused_linear(
    x: torch.Tensor,                  # [M, K] float
    weight: torch.Tensor,             # [N, K]: x's dtype, or int8 with ``scale``
    scale: torch.Tensor | None = None,  # [N] float32
    norm: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 1e-5,
    activation: str = "none",
    out: torch.Tensor | None = None,  # [M, N] any float dtype; written in place (added into with accumulate)
    accumulate: bool = False,
    out_dtype: torch.dtype | None = None,  # of a new out (default x's dtype)
) -> torch.Tensor:
    """epilogue(LayerNorm?(x) @ weightᵀ) in one launch; see the module docstring. Returns out."""
    _check(x, weight, scale, norm, activation, out, accumulate)
    m, n = x.shape[0], weight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    partials, tickets = _SCRATCH.get(x.device, *_scratch_sizes(m, n, launch_config(n, x.shape[1], weight.dtype)))
    norm_weight, norm_bias = norm if norm is not None else (None, None)
    _fused_linear_op(x, weight, scale, norm_weight, norm_bias, float(eps), activation, accumulate, out, partials,
                     tickets)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time list: every specialisation the engine launches for musicgen small / medium / large
# ----------------------------------------------------------------------------------------------------------------
MODEL_SHAPES = {"small": (1024, 4096), "medium": (1536, 6144), "large": (2048, 8192)}  # (hidden, ffn)
HEAD_WIDTHS = (4 * 2048, 8 * 2048)  # LM heads stacked: mono and stereo
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def engine_projections(hidden: int, ffn: int) -> list[tuple[str, int, int, bool, str, bool]]:
    """(role, N, K, norm, activation, accumulate) of a decode step's fused launches."""
    return [("qkv", 3 * hidden, hidden, True, "none", False), ("self_out", hidden, hidden, False, "none", True),
            ("cross_q", hidden, hidden, True, "none", False), ("cross_out", hidden, hidden, False, "none", True),
            ("fc1", ffn, hidden, True, "gelu", False), ("fc2", hidden, ffn, False, "none", True),
            *[("heads", width, hidden, True, "none", False) for width in HEAD_WIDTHS]]


def _variant(norm: bool, activation: str, accumulate: bool, out: str) -> str:
    parts = (["layernorm"] if norm else []) + ([activation] if activation != "none" else []) \
        + (["+= out"] if accumulate else []) + [f"-> {out}"]
    return " ".join(parts)


def _engine_configs() -> list[KernelConfig]:
    seen, configs = set(), []
    for act_dtype in (torch.bfloat16, torch.float16, torch.float32):
        for int8 in (False, True):
            if int8 and act_dtype == torch.float32:
                continue  # int8 with fp32 activations is not a CUDA configuration the engine loads (bf16/fp16)
            weight_dtype = torch.int8 if int8 else act_dtype
            for hidden, ffn in MODEL_SHAPES.values():
                for role, n, k, norm, activation, accumulate in engine_projections(hidden, ffn):
                    config = launch_config(n, k, weight_dtype)
                    out = "fp32" if role == "heads" else _DTYPE_NAMES[act_dtype]
                    # N, K, split_k and k_per_split are runtime arguments: one binary serves every shape of a family
                    key = (act_dtype, int8, out, config.block_n, config.block_k, config.num_warps, config.num_stages,
                           norm, activation, accumulate)
                    if key in seen:
                        continue
                    seen.add(key)
                    dtype = _DTYPE_NAMES[act_dtype]
                    configs.append(make_config(
                        f"fused linear {dtype}{' int8' if int8 else ''} {_variant(norm, activation, accumulate, out)}"
                        f" BLOCK_K={config.block_k}",
                        _fused_linear_kernel,
                        {"out_ptr": f"*{out}", "partial_ptr": "*fp32", "ticket_ptr": "*i32", "x_ptr": f"*{dtype}",
                         "w_ptr": "*i8" if int8 else f"*{dtype}", "scale_ptr": "*fp32" if int8 else f"*{dtype}",
                         "norm_w_ptr": f"*{dtype}", "norm_b_ptr": f"*{dtype}", "M": "i32", "N": "i32", "K": "i32",
                         "split_k": "i32", "k_per_split": "i32", "stride_x": "i32", "stride_w": "i32", "stride_out": "i32",
                         "eps": "fp32"},
                        {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                         "NORM": norm, "ACTIVATION": activation,
                         "ACCUMULATE": accumulate, "INT8": int8},
                        aligned=("out_ptr", "partial_ptr", "ticket_ptr", "x_ptr", "w_ptr", "scale_ptr", "norm_w_ptr",
                                 "norm_b_ptr", "N", "K", "k_per_split", "stride_x", "stride_w", "stride_out"),
                        num_warps=config.num_warps, num_stages=config.num_stages))
    return configs


ENGINE_CONFIGS: list[KernelConfig] = _engine_configs()
