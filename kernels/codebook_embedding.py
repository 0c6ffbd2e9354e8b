"""Fused multi-codebook embedding: out[c·B + b] = Σ_k E_k[tokens[s, k]] + sinusoid[position[s]],  s = slots[b].

Every copy c (cond and uncond rows under classifier-free guidance) gets the same row. K = 4 (mono) or 8 (stereo);
the pad/BOS id has its own row V in every table.
Floor: reads K·D table elements + D sinusoid elements per row, writes copies·D (bf16, D = 1024, K = 4: ~12 KiB/row).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import KernelConfig, make_config
from ._library import define_kernel_op


def codebook_embedding_ref(
    tokens: torch.Tensor,    # [S, K] int64, per-slot current input tokens
    position: torch.Tensor,  # [S] int32, per-slot current position
    slots: torch.Tensor,     # [B] int64, slot of each row
    tables: torch.Tensor,    # [K, V + 1, D]
    sinusoid: torch.Tensor,  # [max_positions, D]
    out: torch.Tensor,       # [copies · B, D], written in place
) -> torch.Tensor:
    batch = slots.shape[0]
    codebooks = tables.shape[0]
    row_tokens = tokens[slots]  # [B, K]
    summed = tables[torch.arange(codebooks, device=tables.device).view(1, -1), row_tokens].float().sum(dim=1)
    summed = summed + sinusoid[position[slots].to(torch.int64)].float()
    out.view(-1, batch, out.shape[-1]).copy_(summed.unsqueeze(0).to(out.dtype))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: one program per (row, BLOCK_D columns); the K table rows are gathered with unrolled independent
# loads so they are all in flight at once, summed in fp32, and the result is stored once per copy.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _codebook_embedding_kernel(
    out_ptr,        # [COPIES · B, D], last dim contiguous
    tokens_ptr,     # [S, K] int64, last dim contiguous
    position_ptr,   # [S] int32
    slots_ptr,      # [B] int64
    tables_ptr,     # [K, V + 1, D], last dim contiguous
    sinusoid_ptr,   # [P, D], last dim contiguous
    batch,
    dim,
    stride_out,
    stride_tokens,
    stride_table_k,
    stride_table_v,
    stride_sinusoid,
    CODEBOOKS: tl.constexpr,
    COPIES: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < dim
    slot = tl.load(slots_ptr + row).to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    table = tables_ptr
    for k in tl.static_range(CODEBOOKS):
        token = tl.load(tokens_ptr + slot * stride_tokens + k).to(tl.int64)
        acc += tl.load(table + token * stride_table_v + cols, mask=mask).to(tl.float32)
        table += stride_table_k  # 64-bit pointer arithmetic: no int32 product k · stride
    pos = tl.load(position_ptr + slot).to(tl.int64)
    acc += tl.load(sinusoid_ptr + pos * stride_sinusoid + cols, mask=mask).to(tl.float32)
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
    assert len(devices) == 1, f"all tensors must be on one device, got {devices}"
    _embedding_op(tokens, position, slots, tables, sinusoid, out)
    return out


def _launch(tokens, position, slots, tables, sinusoid, out) -> None:
    batch = slots.shape[0]
    codebooks, _, dim = tables.shape
    block, warps = launch_config(dim)
    grid = (batch, triton.cdiv(dim, block))
    _codebook_embedding_kernel[grid](
        out, tokens, position, slots, tables, sinusoid,
        batch, dim, out.stride(0), tokens.stride(0), tables.stride(0), tables.stride(1), sinusoid.stride(0),
        CODEBOOKS=codebooks, COPIES=out.shape[0] // batch, BLOCK_D=block, num_warps=warps,
    )


_embedding_op = define_kernel_op(
    "codebook_embedding(Tensor tokens, Tensor position, Tensor slots, Tensor tables, Tensor sinusoid, "
    "Tensor(a!) out) -> ()", _launch)


def _engine_configs() -> list[KernelConfig]:
    # musicgen small / medium / large widths share one specialisation (the width is a runtime argument); 48 = tests
    shapes = {launch_config(dim): dim for dim in (1024, 1536, 2048, 48)}
    configs = []
    for dtype, sin_dtype in (("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")):
        for (block, warps), dim in shapes.items():
            for codebooks in (4, 8):
                for copies, batch_one in ((1, False), (2, False), (2, True)):
                    # the JIT turns an integer argument equal to 1 into a constexpr: batch = 1 is its own variant
                    configs.append(make_config(
                        f"embedding {dtype}/{sin_dtype} BLOCK_D={block} K={codebooks} copies={copies}"
                        + (" B=1" if batch_one else ""),
                        _codebook_embedding_kernel,
                        {"out_ptr": f"*{dtype}", "tokens_ptr": "*i64", "position_ptr": "*i32", "slots_ptr": "*i64",
                         "tables_ptr": f"*{dtype}", "sinusoid_ptr": f"*{sin_dtype}", "batch": "i32", "dim": "i32",
                         "stride_out": "i32", "stride_tokens": "i32", "stride_table_k": "i32",
                         "stride_table_v": "i32", "stride_sinusoid": "i32"},
                        {"CODEBOOKS": codebooks, "COPIES": copies, "BLOCK_D": block}
                        | ({"batch": 1} if batch_one else {}),
                        aligned=("out_ptr", "tokens_ptr", "position_ptr", "slots_ptr", "tables_ptr", "sinusoid_ptr",
                                 "stride_out", "stride_table_k", "stride_table_v", "stride_sinusoid")
                        + (("dim",) if dim % 16 == 0 else ()),
                        num_warps=warps, num_stages=1))
    return configs


ENGINE_CONFIGS: list[KernelConfig] = _engine_configs()
