"""Fused multi-codebook embedding: out[c·B + b] = Σ_k E_k[tokens[s, k]] + sinusoid[position[s]],  s = slots[b].

Every copy c (cond and uncond rows under classifier-free guidance) gets the same row. K = 4 (mono) or 8 (stereo);
the pad/BOS id has its own row V in every table.
Floor: reads K·D table elements + D sinusoid elements per row, writes copies·D (bf16, D = 1024, K = 4: ~12 KiB/row).

Given ``rows`` (StepRows), the kernel that opens a decode step also writes the step's per-row bookkeeping, which would
otherwise cost a dozen small launches (cat, gather, add, cast) before the first layer:
    cache_row[c·B + b]    = s + c · row_offset                   (the engine's uncond rows follow all cond rows)
    self_length[c·B + b]  = position[s] + 1                      (keys after this step's append)
    cross_length[c·B + b] = text_length[s] if c == 0 else 0      (the null condition attends to no text)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._configs import KernelConfig, make_config
from ._library import define_kernel_op


@dataclass(frozen=True)
class StepRows:
    """A decode step's per-row bookkeeping, written by the embedding kernel (see the module docstring) for the
    copies·B rows of ``out``: one input, two outputs the attention kernels read, one the sampler reads."""
    text_length: torch.Tensor   # [S] int32 in: text tokens of each slot's cond row
    row_offset: int             # cache row of copy c of slot s: s + c · row_offset
    cache_row: torch.Tensor     # [copies·B] int64 out
    self_length: torch.Tensor   # [copies·B] int32 out: position + 1
    cross_length: torch.Tensor  # [copies·B] int32 out: text length, 0 past the first copy

    @classmethod
    def allocate(cls, text_length: torch.Tensor, row_offset: int, rows: int) -> "StepRows":
        device = text_length.device
        return cls(text_length, row_offset, torch.empty(rows, dtype=torch.int64, device=device),
                   torch.empty(rows, dtype=torch.int32, device=device), torch.empty(rows, dtype=torch.int32,
                                                                                     device=device))


def codebook_embedding_ref(
    tokens: torch.Tensor,    # [S, K] int64, per-slot current input tokens
    position: torch.Tensor,  # [S] int32, per-slot current position
    slots: torch.Tensor,     # [B] int64, slot of each row
    tables: torch.Tensor,    # [K, V + 1, D]
    sinusoid: torch.Tensor,  # [max_positions, D]
    out: torch.Tensor,       # [copies · B, D], written in place
    rows: StepRows | None = None,  # written in place too
) -> torch.Tensor:
    batch = slots.shape[0]
    codebooks = tables.shape[0]
    row_tokens = tokens[slots]  # [B, K]
    summed = tables[torch.arange(codebooks, device=tables.device).view(1, -1), row_tokens].float().sum(dim=1)
    summed = summed + sinusoid[position[slots].to(torch.int64)].float()
    out.view(-1, batch, out.shape[-1]).copy_(summed.unsqueeze(0).to(out.dtype))
    if rows is not None:
        copies = out.shape[0] // batch
        copy = torch.arange(copies, device=slots.device).view(-1, 1)
        rows.cache_row.copy_((slots + copy * rows.row_offset).flatten())
        rows.self_length.copy_((position[slots] + 1).repeat(copies))
        rows.cross_length.copy_(torch.where(copy == 0, rows.text_length[slots], 0).flatten())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: one program per (row, BLOCK_D columns); the K table rows are gathered with unrolled independent
# loads so they are all in flight at once, summed in fp32, and the result is stored once per copy.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["row_offset"])  # one compiled variant whatever the slot count
def _codebook_embedding_kernel(
    out_ptr,           # [COPIES · B, D], last dim contiguous
    tokens_ptr,        # [S, K] int64, last dim contiguous
    position_ptr,      # [S] int32
    slots_ptr,         # [B] int64
    tables_ptr,        # [K, V + 1, D], last dim contiguous
    sinusoid_ptr,      # [P, D], last dim contiguous
    text_length_ptr,   # [S] int32 (read only when WRITE_ROWS)
    cache_row_ptr,     # [COPIES · B] int64 out (WRITE_ROWS)
    self_length_ptr,   # [COPIES · B] int32 out (WRITE_ROWS)
    cross_length_ptr,  # [COPIES · B] int32 out (WRITE_ROWS)
    batch,
    dim,
    row_offset,
    stride_out,
    stride_tokens,
    stride_table_k,
    stride_table_v,
    stride_sinusoid,
    CODEBOOKS: tl.constexpr,
    COPIES: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_ROWS: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < dim
    slot = tl.load(slots_ptr + row).to(tl.int64)
    position = tl.load(position_ptr + slot)
    if WRITE_ROWS:  # first: nothing of it stays live across the table loads
        if tl.program_id(1) == 0:  # each output row is written by its own program: padding rows never collide
            text_length = tl.load(text_length_ptr + slot)
            for c in tl.static_range(COPIES):
                tl.store(cache_row_ptr + c * batch + row, slot + c * row_offset.to(tl.int64))
                tl.store(self_length_ptr + c * batch + row, position + 1)
                if c == 0:
                    tl.store(cross_length_ptr + row, text_length)
                else:
                    tl.store(cross_length_ptr + c * batch + row, 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    table = tables_ptr
    for k in tl.static_range(CODEBOOKS):
        token = tl.load(tokens_ptr + slot * stride_tokens + k).to(tl.int64)
        acc += tl.load(table + token * stride_table_v + cols, mask=mask).to(tl.float32)
        table += stride_table_k  # 64-bit pointer arithmetic: no int32 product k · stride
    acc += tl.load(sinusoid_ptr + position.to(tl.int64) * stride_sinusoid + cols, mask=mask).to(tl.float32)
    value = acc.to(out_ptr.dtype.element_ty)
    for c in tl.static_range(COPIES):
        tl.store(out_ptr + (c * batch + row).to(tl.int64) * stride_out + cols, value, mask=mask)


def launch_config(dim: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps): 512 columns per program (8 bf16 = 16 B per thread with 2 warps), fewer for tiny dims."""
    block = min(512, triton.next_power_of_2(dim))
    return block, max(1, min(4, block // 256))


def codebook_embedding(
    tokens: torch.Tensor,    # [S, K] int64, per-slot current input tokens
    position: torch.Tensor,  # [S] int32, per-slot current position
    slots: torch.Tensor,     # [B] int64, slot of each row
    tables: torch.Tensor,    # [K, V + 1, D]
    sinusoid: torch.Tensor,  # [max_positions, D]
    out: torch.Tensor,       # [copies · B, D], written in place
    rows: StepRows | None = None,  # written in place too
) -> torch.Tensor:
    batch = slots.shape[0]
    codebooks, _, dim = tables.shape
    assert tokens.dtype == torch.int64 and tokens.dim() == 2 and tokens.shape[1] == codebooks, \
        f"tokens must be int64 [S, {codebooks}], got {tokens.dtype} {tuple(tokens.shape)}"
    assert tokens.stride(1) == 1, "tokens must be contiguous in its last dim"
    assert position.dtype == torch.int32 and position.shape == (tokens.shape[0],), \
        f"position must be int32 [{tokens.shape[0]}], got {position.dtype} {tuple(position.shape)}"
    assert slots.dtype == torch.int64 and slots.dim() == 1, f"slots must be int64 [B], got {slots.dtype}"
    assert tables.dtype.is_floating_point and tables.stride(2) == 1, "tables must be float, last dim contiguous"
    assert sinusoid.dtype.is_floating_point and sinusoid.dim() == 2 and sinusoid.shape[1] == dim \
        and sinusoid.stride(1) == 1, f"sinusoid must be float [P, {dim}] with a contiguous last dim"
    assert out.dim() == 2 and out.shape[1] == dim and out.stride(1) == 1 and batch > 0 and out.shape[0] % batch == 0, \
        f"out must be [copies·{batch}, {dim}] with a contiguous last dim, got {tuple(out.shape)}"
    devices = {t.device for t in (tokens, position, slots, tables, sinusoid, out)}
    if rows is None:
        assert len(devices) == 1, f"all tensors must be on one device, got {devices}"
        _embedding_op(tokens, position, slots, tables, sinusoid, out)
        return out
    assert rows.text_length.dtype == torch.int32 and rows.text_length.shape == position.shape, \
        f"rows.text_length must be int32 [{position.shape[0]}], got {rows.text_length.dtype}"
    for name, dtype in (("cache_row", torch.int64), ("self_length", torch.int32), ("cross_length", torch.int32)):
        tensor = getattr(rows, name)
        assert tensor.dtype == dtype and tensor.shape == (out.shape[0],) and tensor.is_contiguous(), \
            f"rows.{name} must be contiguous {dtype} [{out.shape[0]}], got {tensor.dtype} {tuple(tensor.shape)}"
    assert 0 <= rows.row_offset < 2**31, f"rows.row_offset must be in [0, 2^31), got {rows.row_offset}"
    devices |= {t.device for t in (rows.text_length, rows.cache_row, rows.self_length, rows.cross_length)}
    assert len(devices) == 1, f"all tensors must be on one device, got {devices}"
    _embedding_rows_op(tokens, position, slots, tables, sinusoid, rows.text_length, rows.row_offset, out,
                       rows.cache_row, rows.self_length, rows.cross_length)
    return out


def _launch(tokens, position, slots, tables, sinusoid, out, text_length=None, row_offset=0, cache_row=None,
            self_length=None, cross_length=None) -> None:
    batch = slots.shape[0]
    codebooks, _, dim = tables.shape
    block, warps = launch_config(dim)
    grid = (batch, triton.cdiv(dim, block))
    write_rows = cache_row is not None
    if not write_rows:  # placeholders, never touched
        text_length, cache_row, self_length, cross_length = position, slots, position, position
    _codebook_embedding_kernel[grid](
        out, tokens, position, slots, tables, sinusoid, text_length, cache_row, self_length, cross_length,
        batch, dim, row_offset, out.stride(0), tokens.stride(0), tables.stride(0), tables.stride(1),
        sinusoid.stride(0),
        CODEBOOKS=codebooks, COPIES=out.shape[0] // batch, BLOCK_D=block, WRITE_ROWS=write_rows, num_warps=warps,
    )


def _launch_with_rows(tokens, position, slots, tables, sinusoid, text_length, row_offset, out, cache_row,
                      self_length, cross_length) -> None:
    _launch(tokens, position, slots, tables, sinusoid, out, text_length, row_offset, cache_row, self_length,
            cross_length)


_embedding_op = define_kernel_op(
    "codebook_embedding(Tensor tokens, Tensor position, Tensor slots, Tensor tables, Tensor sinusoid, "
    "Tensor(a!) out) -> ()", _launch)
_embedding_rows_op = define_kernel_op(
    "codebook_embedding_rows(Tensor tokens, Tensor position, Tensor slots, Tensor tables, Tensor sinusoid, "
    "Tensor text_length, int row_offset, Tensor(a!) out, Tensor(b!) cache_row, Tensor(c!) self_length, "
    "Tensor(d!) cross_length) -> ()", _launch_with_rows)


def _engine_configs() -> list[KernelConfig]:
    # musicgen small / medium / large widths share one specialisation (the width is a runtime argument); 48 = tests
    shapes = {launch_config(dim): dim for dim in (1024, 1536, 2048, 48)}
    configs = []
    for dtype, sin_dtype in (("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")):
        for (block, warps), dim in shapes.items():
            for codebooks in (4, 8):
                # the engine's step: 2 copies with the step's rows; 1 copy without, for callers outside the engine.
                # The JIT turns an integer argument equal to 1 into a constexpr: batch = 1 is its own variant.
                for copies, batch_one, rows in ((1, False, False), (2, False, True), (2, True, True)):
                    configs.append(make_config(
                        f"embedding {dtype}/{sin_dtype} BLOCK_D={block} K={codebooks} copies={copies}"
                        + (" B=1" if batch_one else "") + (" rows" if rows else ""),
                        _codebook_embedding_kernel,
                        {"out_ptr": f"*{dtype}", "tokens_ptr": "*i64", "position_ptr": "*i32", "slots_ptr": "*i64",
                         "tables_ptr": f"*{dtype}", "sinusoid_ptr": f"*{sin_dtype}", "text_length_ptr": "*i32",
                         "cache_row_ptr": "*i64", "self_length_ptr": "*i32", "cross_length_ptr": "*i32",
                         "batch": "i32", "dim": "i32", "row_offset": "i32", "stride_out": "i32",
                         "stride_tokens": "i32", "stride_table_k": "i32", "stride_table_v": "i32",
                         "stride_sinusoid": "i32"},
                        {"CODEBOOKS": codebooks, "COPIES": copies, "BLOCK_D": block, "WRITE_ROWS": rows}
                        | ({"batch": 1} if batch_one else {}),
                        aligned=("out_ptr", "tokens_ptr", "position_ptr", "slots_ptr", "tables_ptr", "sinusoid_ptr",
                                 "text_length_ptr", "cache_row_ptr", "self_length_ptr", "cross_length_ptr",
                                 "stride_out", "stride_table_k", "stride_table_v", "stride_sinusoid")
                        + (("dim",) if dim % 16 == 0 else ()),
                        num_warps=warps, num_stages=1))
    return configs


ENGINE_CONFIGS: list[KernelConfig] = _engine_configs()
