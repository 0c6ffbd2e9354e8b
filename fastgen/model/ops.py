"""The custom ops of a decode step, per backend.

- "torch": plain PyTorch. Attention masks are built once per step and shared by all layers, and attention itself is
  one ``scaled_dot_product_attention`` call over the gathered cache rows (up to a host-known bound), so a step on a
  CPU costs about a hundred operator calls. The math is that of the references in ``fastgen.kernels``.
- "triton": the kernels in ``fastgen.kernels`` (embedding, split-KV decode attention, fused CFG + sampling), which
  read exactly each row's filled part of the cache.

Both write the step's new K/V into the static cache and never sync with the host."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastgen.kernels.codebook_embedding import codebook_embedding_ref
from fastgen.kernels.sampling import RowParams, sample_next_tokens_ref


@dataclass(frozen=True)
class SamplerHints:
    """Host-known facts about the batch that let the torch sampler skip work (the kernels need none), and the
    per-row parameters gathered once for the batch."""
    any_sampling: bool = True
    any_guidance: bool = True
    max_top_k: int = -1        # -1: unknown; 0: no row uses top-k
    any_top_p: bool = True
    rows: RowParams | None = None


@dataclass
class StepContext:
    rows: torch.Tensor           # [R] cache rows
    position: torch.Tensor       # [R] int64 position of the input token
    text_length: torch.Tensor    # [R] int32
    self_length: torch.Tensor | None = None  # triton backend: [R] int32, position + 1
    self_bias: torch.Tensor | None = None   # torch backend: additive masks [R, 1, 1, span]
    cross_bias: torch.Tensor | None = None
    kv_span: int | None = None
    text_span: int | None = None


class TorchOps:
    name = "torch"

    def embed(self, tokens, position, slots, tables, sinusoid, out):
        return codebook_embedding_ref(tokens, position, slots, tables, sinusoid, out)

    def begin_step(self, rows, position, text_length, kv_span: int, text_span: int,
                   dtype: torch.dtype = torch.float32) -> StepContext:
        ctx = StepContext(rows, position, text_length, kv_span=kv_span, text_span=text_span)
        # a large negative bias, not -inf: a row with no text (null condition) then averages its zero K/V rows
        # instead of producing NaN, and padding keys get exactly zero weight whenever one real key exists
        # (two aranges, not one of max(kv_span, text_span): under torch.compile that max would guard the order of
        # the two spans and recompile when it flips)
        low = torch.finfo(dtype).min
        self_keys = torch.arange(kv_span, device=rows.device)
        text_keys = torch.arange(text_span, device=rows.device)
        ctx.self_bias = torch.where(self_keys <= position.view(-1, 1), 0.0, low).to(dtype).view(-1, 1, 1, kv_span)
        ctx.cross_bias = torch.where(text_keys < text_length.view(-1, 1), 0.0, low).to(dtype).view(-1, 1, 1, text_span)
        return ctx

    def self_attention(self, ctx: StepContext, k_cache, v_cache, q, k, v, scale: float) -> torch.Tensor:
        k_cache[ctx.rows, :, ctx.position] = k
        v_cache[ctx.rows, :, ctx.position] = v
        return _gathered_attention(q, k_cache, v_cache, ctx.rows, ctx.kv_span, ctx.self_bias, scale)

    def cross_attention(self, ctx: StepContext, k_cache, v_cache, q, scale: float) -> torch.Tensor:
        return _gathered_attention(q, k_cache, v_cache, ctx.rows, ctx.text_span, ctx.cross_bias, scale)

    def sample(self, *args, hints: SamplerHints = SamplerHints(), **kwargs) -> None:
        sample_next_tokens_ref(*args, **kwargs, any_sampling=hints.any_sampling, any_guidance=hints.any_guidance,
                               max_top_k=hints.max_top_k, any_top_p=hints.any_top_p, rows=hints.rows)


def _gathered_attention(q, k_cache, v_cache, rows, span, bias, scale) -> torch.Tensor:
    keys = k_cache[rows, :, :span]      # [R, H, span, Dh]
    values = v_cache[rows, :, :span]
    if torch.compiler.is_compiling() or (q.device.type == "cpu" and q.dtype != torch.float32):
        # spelled out: under torch.compile inductor fuses the scaling, mask and softmax into its own loops (SDPA would
        # stay one opaque call, ~14 µs on a CPU for a tiny model); and on a CPU in bf16, SDPA's single-query path is
        # ~5× slower than these two matmuls (musicgen-small shapes, 1 thread: 5.2 vs 1.0 ms at 1536 keys), with the
        # softmax in fp32 for accuracy. Eagerly in fp32 SDPA is the cheaper call.
        scores = torch.matmul(q.unsqueeze(2) * scale, keys.transpose(-1, -2)) + bias
        return torch.matmul(scores.float().softmax(-1).to(values.dtype), values).squeeze(2)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=bias, scale=scale)
    return out.squeeze(2)


class TritonOps:
    name = "triton"

    def __init__(self) -> None:
        # imported here: the kernels need triton's JIT (or TRITON_INTERPRET=1 on a CPU)
        from fastgen.kernels.codebook_embedding import codebook_embedding
        from fastgen.kernels.decode_attention import decode_attention, decode_attention_append
        from fastgen.kernels.sampling import sample_next_tokens
        self.embed = codebook_embedding
        self._attention = decode_attention
        self._attention_append = decode_attention_append
        self._sample = sample_next_tokens

    def begin_step(self, rows, position, text_length, kv_span: int | None, text_span: int | None,
                   dtype: torch.dtype | None = None) -> StepContext:
        return StepContext(rows, position, text_length, self_length=(position + 1).to(torch.int32))

    def self_attention(self, ctx: StepContext, k_cache, v_cache, q, k, v, scale: float) -> torch.Tensor:
        # the kernel writes this step's K/V at position length − 1 itself (no scatter launches)
        return self._attention_append(q, k, v, k_cache, v_cache, ctx.rows, ctx.self_length, scale)

    def cross_attention(self, ctx: StepContext, k_cache, v_cache, q, scale: float) -> torch.Tensor:
        return self._attention(q, k_cache, v_cache, ctx.rows, ctx.text_length, scale)

    def sample(self, *args, hints: SamplerHints | None = None, **kwargs) -> None:
        self._sample(*args, **kwargs)


Ops = TorchOps | TritonOps


def get_ops(backend: str) -> Ops:
    if backend == "torch":
        return TorchOps()
    if backend == "triton":
        return TritonOps()
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
