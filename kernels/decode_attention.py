"""Single-query attention over a static KV cache (decode): each row reads only the filled part of its cache row.

out[r, h] = softmax(q[r, h] · K[cache_row[r], h, :length[r]]ᵀ · scale) · V[cache_row[r], h, :length[r]]
A row with length 0 (unconditional cross-attention, graph padding) gets exactly 0, never NaN.
Serves self-attention (length = position + 1) and cross-attention (length = text tokens; 0 for the null condition).
Floor: reads 2·length·H·Dh cache elements per row (bf16, H·Dh = 1024, length 1500: 6 MiB per row per layer).

Flash-decoding in one launch: one program per (row, head, split of SPLIT = 256 keys) runs an online softmax over its
split and writes a partial output and its log-sum-exp (base 2) to scratch; splits past the row's length exit at once.
Then it takes a ticket (an atomic counter per (row, head), acquire-release at GPU scope, after a barrier so that every
thread's partial is stored): the program that draws the last ticket of its row's used splits merges them, in split
order, writes the output and resets the counter to 0 for the next launch. An empty row's first split writes its zero
output. The split size is fixed and the merge order is the split order, so a row's result does not depend on its
batch-mates, on which program arrives last, or on `max_length`; the grid is sized from `max_length` (or L), never
from device values, so the launch can be captured in a CUDA graph. When one split covers `max_length`
(cross-attention over text, short prompts) the program writes the output directly, no ticket: bit-identical to the
merged result (weight exp2(0) = 1).
Stage one is a GEMV per (row, head): 64-key × Dh tiles of K and V are loaded together and reduced with tl.sum in
fp32 (4 warps); with one query per head a tl.dot would run mostly on padding, and its cp.async pipelining is the
only thing it would add — worth measuring on a GPU (bench/kernel_bench.py) before switching.

`decode_attention_append` also writes this step's key and value at position length − 1 of each cache row (the
program whose split holds that position stores them and uses them directly), saving the two scatter launches of
self-attention per layer.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._configs import KernelConfig, make_config
from ._library import define_kernel_op
from ._scratch import ReductionScratch

SPLIT = 256    # keys per stage-one program
BLOCK_N = 64   # keys per inner iteration (a 64 x 64 tile of K, then of V)


def decode_attention_ref(
    q: torch.Tensor,          # [R, H, Dh]
    k_cache: torch.Tensor,    # [N, H, L_max, Dh]
    v_cache: torch.Tensor,    # [N, H, L_max, Dh]
    cache_row: torch.Tensor,  # [R] int64, cache row of each query row
    length: torch.Tensor,     # [R] int32, number of valid keys (a prefix of the row)
    scale: float,
    out: torch.Tensor | None = None,  # [R, H, Dh]
    max_length: int | None = None,    # host-known bound on length: lets the torch path read less of the cache
) -> torch.Tensor:
    span = k_cache.shape[2] if max_length is None else min(max_length, k_cache.shape[2])
    keys = k_cache[cache_row, :, :span]    # [R, H, span, Dh]
    values = v_cache[cache_row, :, :span]
    scores = torch.einsum("rhd,rhld->rhl", q.float(), keys.float()) * scale
    valid = torch.arange(span, device=q.device).view(1, 1, -1) < length.view(-1, 1, 1)
    scores = scores.masked_fill(~valid, -float("inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows → 0
    result = torch.einsum("rhl,rhld->rhd", weights, values.float()).to(q.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def decode_attention_append_ref(
    q: torch.Tensor,          # [R, H, Dh]
    k_new: torch.Tensor,      # [R, H, Dh], this step's key of each row
    v_new: torch.Tensor,      # [R, H, Dh]
    k_cache: torch.Tensor,    # [N, H, L_max, Dh], written at [cache_row[r], :, length[r] − 1]
    v_cache: torch.Tensor,
    cache_row: torch.Tensor,  # [R] int64
    length: torch.Tensor,     # [R] int32, keys after the append (position + 1); rows with length 0 write nothing
    scale: float,
    out: torch.Tensor | None = None,
    max_length: int | None = None,    # must bound length
) -> torch.Tensor:
    """Self-attention step: append k_new / v_new to the cache, then attend over the first `length` keys."""
    write = length > 0
    position = (length.to(torch.int64) - 1)[write]
    k_cache[cache_row[write], :, position] = k_new[write]
    v_cache[cache_row[write], :, position] = v_new[write]
    return decode_attention_ref(q, k_cache, v_cache, cache_row, length, scale, out, max_length)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _decode_attention_split_kernel(
    out_ptr,          # [R, H, Dh], last dim contiguous
    scratch_ptr,      # fp32: [R, H, splits, Dh] partial outputs, then at lse_offset [R, H, splits] log2-sum-exp2
    ticket_ptr,       # int32 [R · H] arrival counters, 0 between launches (not read when DIRECT)
    q_ptr,            # [R, H, Dh], last dim contiguous
    k_new_ptr,        # [R, H, Dh] this step's keys (read only when APPEND)
    v_new_ptr,        # [R, H, Dh], same strides as k_new
    k_ptr,            # [N, H, L, Dh], last dim contiguous
    v_ptr,            # [N, H, L, Dh], same strides as k
    cache_row_ptr,    # [R] int64
    length_ptr,       # [R] int32
    scale_log2,       # softmax scale · log2(e)
    span,             # keys a row may read: min(max_length, L)
    heads,
    splits,
    lse_offset,
    stride_q_r,
    stride_q_h,
    stride_new_r,
    stride_new_h,
    stride_kv_n,
    stride_kv_h,
    stride_kv_l,
    stride_out_r,
    stride_out_h,
    HEAD_DIM: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr,
    APPEND: tl.constexpr,
    BLOCK_S: tl.constexpr,  # ≥ splits: the merge's width
):
    row_head = tl.program_id(0)
    split = tl.program_id(1)
    row = row_head // heads
    head = row_head % heads
    dims = tl.arange(0, HEAD_DIM)
    length = tl.minimum(tl.load(length_ptr + row), span)
    start = split * SPLIT
    if not DIRECT:
        if start >= length:  # the merge ignores splits past the row's length
            if split == 0:  # an empty row: no split takes a ticket, so the first writes the zero output
                tl.store(out_ptr + row.to(tl.int64) * stride_out_r + head * stride_out_h + dims,
                         tl.zeros([HEAD_DIM], dtype=out_ptr.dtype.element_ty))
            return
    # DIRECT: the single split runs even for an empty row (no iterations) and writes its zero output below.
    end = tl.minimum(start + SPLIT, length)

    q = tl.load(q_ptr + row.to(tl.int64) * stride_q_r + head * stride_q_h + dims).to(tl.float32) * scale_log2
    cache_row = tl.load(cache_row_ptr + row).to(tl.int64)
    base = cache_row * stride_kv_n + head.to(tl.int64) * stride_kv_h
    m = -float("inf")
    denom = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    cached_end = end
    if APPEND:
        # The key at length − 1 is this step's: the split holding it stores it to the cache and starts its online
        # softmax from it (first, so nothing extra stays live across the loop); the loop reads the cached keys only.
        cached_end = tl.maximum(tl.minimum(end, length - 1), start)  # = start = end for an empty row: no append
        holds_new = cached_end < end
        new_mask = dims < tl.where(holds_new, HEAD_DIM, 0)
        new_offset = row.to(tl.int64) * stride_new_r + head * stride_new_h + dims
        k_new = tl.load(k_new_ptr + new_offset, mask=new_mask, other=0.0)
        v_new = tl.load(v_new_ptr + new_offset, mask=new_mask, other=0.0)
        tl.store(k_ptr + base + cached_end.to(tl.int64) * stride_kv_l + dims, k_new, mask=new_mask)
        tl.store(v_ptr + base + cached_end.to(tl.int64) * stride_kv_l + dims, v_new, mask=new_mask)
        m = tl.where(holds_new, tl.sum(k_new.to(tl.float32) * q, axis=0), -float("inf"))
        denom = tl.where(holds_new, 1.0, 0.0)
        acc = v_new.to(tl.float32)  # zero where the split does not hold the new key
    # A while loop, not range(start, cached_end, BLOCK_N): Triton 3.6's interpreter cannot take a range bound from
    # a loaded value under NumPy >= 2.4 (int() of a 1-element array), while a loop condition works there.
    first = start
    while first < cached_end:
        keys = first + tl.arange(0, BLOCK_N)
        valid = keys < cached_end
        offsets = base + keys.to(tl.int64)[:, None] * stride_kv_l + dims[None, :]
        k = tl.load(k_ptr + offsets, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + offsets, mask=valid[:, None], other=0.0)  # issued with K: both tiles in flight at once
        scores = tl.where(valid, tl.sum(k.to(tl.float32) * q[None, :], axis=1), -float("inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new)
        denom = denom * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m = m_new
        first += BLOCK_N

    partial = acc / tl.maximum(denom, 1.0)  # denom ≥ 1 (its largest term is exp2(0)) unless the row is empty: 0 / 1
    if DIRECT:
        tl.store(out_ptr + row.to(tl.int64) * stride_out_r + head * stride_out_h + dims,
                 partial.to(out_ptr.dtype.element_ty))
    else:
        first = row_head.to(tl.int64) * splits
        tl.store(scratch_ptr + (first + split) * HEAD_DIM + dims, partial)
        tl.store(scratch_ptr + lse_offset + first + split, m + tl.log2(denom))
        tl.debug_barrier()  # every thread's part of the partial is stored before the ticket (release) is taken
        used = (length + SPLIT - 1) // SPLIT  # ≥ 1 here: this split is one of them
        ticket = tl.atomic_add(ticket_ptr + row_head, 1, sem="acq_rel", scope="gpu")
        if ticket == used - 1:  # the last to arrive: every used split's partial is visible (acquire)
            split_ids = tl.arange(0, BLOCK_S)
            valid = split_ids < used  # the splits past them hold stale data
            lse = tl.load(scratch_ptr + lse_offset + first + split_ids, mask=valid, other=-float("inf"))
            m = tl.max(lse, axis=0)
            weight = tl.where(valid, tl.exp2(lse - m), 0.0)
            parts = tl.load(scratch_ptr + (first + split_ids)[:, None] * HEAD_DIM + dims[None, :],
                            mask=valid[:, None], other=0.0)
            merged = tl.sum(weight[:, None] * parts, axis=0) / tl.sum(weight, axis=0)
            tl.store(out_ptr + row.to(tl.int64) * stride_out_r + head * stride_out_h + dims,
                     merged.to(out_ptr.dtype.element_ty))
            tl.atomic_xchg(ticket_ptr + row_head, 0)  # ready for the next launch


_SCRATCH = ReductionScratch("decode_attention", "reserve_decode_scratch()")


def _scratch_elements(rows: int, heads: int, splits: int, head_dim: int) -> int:
    return rows * heads * splits * (head_dim + 1)


def reserve_decode_scratch(rows: int, heads: int, max_length: int, device: torch.device | str,
                           head_dim: int = 64) -> None:
    """Allocate split-KV scratch for the largest batch and length up front (call before CUDA-graph capture)."""
    _SCRATCH.get(device, _scratch_elements(rows, heads, triton.cdiv(max_length, SPLIT), head_dim), rows * heads)


def scratch_buffer(device: torch.device | str) -> torch.Tensor | None:
    """The scratch buffer the launchers use on ``device`` now (None before the first launch or reservation)."""
    current = _SCRATCH.current(device)
    return None if current is None else current[0]


def launch_config(span: int, head_dim: int) -> dict:
    """Everything the launcher picks from host-known sizes: splits, constexprs and warps."""
    splits = max(1, triton.cdiv(span, SPLIT))
    return {
        "splits": splits,
        "direct": splits == 1,
        "block_s": triton.next_power_of_2(splits),
        "split_warps": 4 if head_dim >= 64 else 2,
        "split_stages": 2,
    }


def _check(q, k_cache, v_cache, cache_row, length, out) -> None:
    rows, heads, head_dim = q.shape
    assert q.dim() == 3 and q.stride(2) == 1, f"q must be [R, H, Dh] with a contiguous last dim, got {q.stride()}"
    assert head_dim in (16, 32, 64, 128), f"head dim must be a power of two in [16, 128], got {head_dim}"
    assert k_cache.dim() == 4 and k_cache.shape[1] == heads and k_cache.shape[3] == head_dim, \
        f"k_cache must be [N, {heads}, L, {head_dim}], got {tuple(k_cache.shape)}"
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride() and k_cache.stride(3) == 1, \
        "k_cache and v_cache must share shape and strides, with a contiguous last dim"
    assert q.dtype == k_cache.dtype == v_cache.dtype and q.dtype.is_floating_point, \
        f"q, k_cache, v_cache must share one float dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
    assert cache_row.dtype == torch.int64 and cache_row.shape == (rows,), \
        f"cache_row must be int64 [{rows}], got {cache_row.dtype} {tuple(cache_row.shape)}"
    assert length.dtype == torch.int32 and length.shape == (rows,), \
        f"length must be int32 [{rows}], got {length.dtype} {tuple(length.shape)}"
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1, \
        f"out must be {q.dtype} {tuple(q.shape)} with a contiguous last dim"
    devices = {t.device for t in (q, k_cache, v_cache, cache_row, length, out)}
    assert len(devices) == 1, f"all tensors must be on one device, got {devices}"


def _launch(q, k_new, v_new, k_cache, v_cache, cache_row, length, scale, out, max_length) -> torch.Tensor:
    rows, heads, head_dim = q.shape
    if rows == 0:
        return out
    span = k_cache.shape[2] if max_length is None else min(max_length, k_cache.shape[2])
    # No torch op on the scratch once it is large enough: the launcher issues the same work every step.
    scratch, tickets = _SCRATCH.get(q.device, _scratch_elements(rows, heads, launch_config(span, head_dim)["splits"],
                                                                 head_dim), rows * heads)
    if k_new is None:
        _attention_op(q, k_cache, v_cache, cache_row, length, float(scale), span, out, scratch, tickets)
    else:
        _attention_append_op(q, k_new, v_new, k_cache, v_cache, cache_row, length, float(scale), span, out, scratch,
                             tickets)
    return out


def _run_kernel(q, k_new, v_new, k_cache, v_cache, cache_row, length, scale, span, out, scratch, tickets) -> None:
    """The launch of one call; ``scratch`` holds at least _scratch_elements(rows, heads, splits, head_dim),
    ``tickets`` rows · heads zeros (and leaves them zero)."""
    rows, heads, head_dim = q.shape
    config = launch_config(span, head_dim)
    splits = config["splits"]
    lse_offset = rows * heads * splits * head_dim
    append = k_new is not None
    new = (k_new, v_new) if append else (q, q)  # placeholders, never read without APPEND
    _decode_attention_split_kernel[(rows * heads, splits)](
        out, scratch, tickets, q, *new, k_cache, v_cache, cache_row, length, scale * math.log2(math.e), span,
        heads, splits, lse_offset, q.stride(0), q.stride(1), new[0].stride(0), new[0].stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, SPLIT=SPLIT, BLOCK_N=BLOCK_N, DIRECT=config["direct"], APPEND=append,
        BLOCK_S=config["block_s"], num_warps=config["split_warps"], num_stages=config["split_stages"],
    )


def _run_kernel_no_append(q, k_cache, v_cache, cache_row, length, scale, span, out, scratch, tickets) -> None:
    _run_kernel(q, None, None, k_cache, v_cache, cache_row, length, scale, span, out, scratch, tickets)


# The scratch and tickets are arguments (mutated), not looked up inside: a recorded or captured call keeps using the
# buffers it was given, as a CUDA graph keeps its pointers.
_attention_op = define_kernel_op(
    "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_row, Tensor length, float scale, "
    "int span, Tensor(a!) out, Tensor(b!) scratch, Tensor(c!) tickets) -> ()",
    _run_kernel_no_append)
_attention_append_op = define_kernel_op(
    "decode_attention_append(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor cache_row, Tensor length, float scale, int span, Tensor(c!) out, Tensor(d!) scratch, "
    "Tensor(e!) tickets) -> ()",
    _run_kernel)


def decode_attention(
    q: torch.Tensor,          # [R, H, Dh]
    k_cache: torch.Tensor,    # [N, H, L_max, Dh]
    v_cache: torch.Tensor,    # [N, H, L_max, Dh]
    cache_row: torch.Tensor,  # [R] int64, cache row of each query row
    length: torch.Tensor,     # [R] int32, number of valid keys (a prefix of the row)
    scale: float,
    out: torch.Tensor | None = None,  # [R, H, Dh]
    max_length: int | None = None,    # host-known bound on length: sizes the grid (keys past it are never read)
) -> torch.Tensor:
    out = torch.empty_like(q) if out is None else out
    _check(q, k_cache, v_cache, cache_row, length, out)
    return _launch(q, None, None, k_cache, v_cache, cache_row, length, scale, out, max_length)


def decode_attention_append(
    q: torch.Tensor,          # [R, H, Dh]
    k_new: torch.Tensor,      # [R, H, Dh], this step's key of each row
    v_new: torch.Tensor,      # [R, H, Dh]
    k_cache: torch.Tensor,    # [N, H, L_max, Dh], written at [cache_row[r], :, length[r] − 1]
    v_cache: torch.Tensor,
    cache_row: torch.Tensor,  # [R] int64
    length: torch.Tensor,     # [R] int32, keys after the append (position + 1); rows with length 0 write nothing
    scale: float,
    out: torch.Tensor | None = None,
    max_length: int | None = None,    # must bound length (a row whose new key lies past it is not written)
) -> torch.Tensor:
    out = torch.empty_like(q) if out is None else out
    _check(q, k_cache, v_cache, cache_row, length, out)
    assert k_new.shape == v_new.shape == q.shape and k_new.dtype == v_new.dtype == q.dtype, \
        f"k_new and v_new must be {q.dtype} {tuple(q.shape)}"
    assert k_new.stride() == v_new.stride() and k_new.stride(2) == 1 and k_new.device == q.device, \
        "k_new and v_new must share strides, with a contiguous last dim, on q's device"
    return _launch(q, k_new, v_new, k_cache, v_cache, cache_row, length, scale, out, max_length)


def _engine_configs() -> list[KernelConfig]:
    """Every specialisation the launchers can pick at the engine's shapes (Dh = 64, lengths up to 4096) and the
    tests' (Dh = 16): direct, and each merge width."""
    configs = []
    for dtype in ("bf16", "fp16", "fp32"):
        for head_dim in (64, 16):
            spans = (256, 512, 1024, 1500, 2048, 4096) if head_dim == 64 else (40, 600)
            for block_s in sorted({launch_config(span, head_dim)["block_s"] for span in spans}):
                direct = block_s == 1
                cfg = launch_config(SPLIT * block_s, head_dim)
                for append in (False, True):
                    configs.append(make_config(
                        f"attention split {dtype} Dh={head_dim} " + ("direct" if direct else f"BLOCK_S={block_s}")
                        + f" append={append}",
                        _decode_attention_split_kernel,
                        {"out_ptr": f"*{dtype}", "scratch_ptr": "*fp32", "ticket_ptr": "*i32", "q_ptr": f"*{dtype}",
                         "k_new_ptr": f"*{dtype}", "v_new_ptr": f"*{dtype}", "k_ptr": f"*{dtype}",
                         "v_ptr": f"*{dtype}", "cache_row_ptr": "*i64", "length_ptr": "*i32", "scale_log2": "fp32",
                         "span": "i32", "heads": "i32", "splits": "i32", "lse_offset": "i32", "stride_q_r": "i32",
                         "stride_q_h": "i32", "stride_new_r": "i32", "stride_new_h": "i32", "stride_kv_n": "i32",
                         "stride_kv_h": "i32", "stride_kv_l": "i32", "stride_out_r": "i32", "stride_out_h": "i32"},
                        {"HEAD_DIM": head_dim, "SPLIT": SPLIT, "BLOCK_N": BLOCK_N, "DIRECT": direct,
                         "APPEND": append, "BLOCK_S": block_s} | ({"splits": 1} if direct else {}),  # JIT's constexpr 1
                        aligned=("out_ptr", "scratch_ptr", "ticket_ptr", "q_ptr", "k_new_ptr", "v_new_ptr", "k_ptr",
                                 "v_ptr", "cache_row_ptr", "length_ptr", "lse_offset", "stride_q_r", "stride_q_h",
                                 "stride_new_r", "stride_new_h", "stride_kv_n", "stride_kv_h", "stride_kv_l",
                                 "stride_out_r", "stride_out_h"),
                        num_warps=cfg["split_warps"], num_stages=cfg["split_stages"]))
    return configs


ENGINE_CONFIGS: list[KernelConfig] = _engine_configs()
