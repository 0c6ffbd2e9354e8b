"""The custom ops of a decode step, per backend.

- "torch": plain PyTorch. Attention masks are built once per step and shared by all layers, and attention itself is
  one ``scaled_dot_product_attention`` call over the gathered cache rows (up to a host-known bound), so a step on a
  CPU costs about a hundred operator calls. The math is that of the references in ``fastgen.kernels``.
- "triton": the kernels in ``fastgen.kernels`` (embedding, split-KV decode attention, fused CFG + sampling), which
  read exactly each row's filled part of the cache. The step's bookkeeping runs inside them: the embedding kernel
  writes each row's cache row and attention lengths, the sampler advances the positions, so nothing launches
  between the kernels but the decoder's own layers.

A step is ``begin_step`` (embed the batch's input tokens, make the StepContext), the decoder's layers (which call
``self_attention`` / ``cross_attention``), then ``end_step`` (sample the next tokens, advance the positions). Both
backends write the step's new K/V into the static cache and never sync with the host. ``state`` is the runner's
per-slot tensors (fastgen.engine.runner.SlotState); row b of a batch of B is slot ``slots[b]``'s cond row, row
B + b its uncond row."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastgen.kernels.codebook_embedding import codebook_embedding_ref
from fastgen.kernels.sampling_ref import RowParams, advance_positions_ref, sample_next_tokens_ref


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
    rows: torch.Tensor           # [R] int64 cache rows
    position: torch.Tensor | None  # torch backend: [R] int64 position of the input token
    text_length: torch.Tensor    # [R] int32 (0: the null condition)
    slots: torch.Tensor | None = None        # [B] int64 slot of each batch row (a step's context)
    self_length: torch.Tensor | None = None  # triton backend: [R] int32, position + 1
    self_bias: torch.Tensor | None = None   # torch backend: additive masks [R, 1, 1, span]
    cross_bias: torch.Tensor | None = None
    kv_span: int | None = None
    text_span: int | None = None
    # torch backend on a CPU: the batch's rows as runs of consecutive cache rows, read as views (see _row_runs)
    self_runs: list[tuple[int, int, int]] | None = None
    cross_runs: list[tuple[int, int, int]] | None = None


class TorchOps:
    name = "torch"
    # on a CPU with AVX2: attention through fastgen.kernels.cpu_attention, which reads each row of the layer's
    # cache in place (neither runs nor a gather needed), and the sampler as one operator
    # (fastgen.kernels.cpu_sampling); set by choose_cpu_kernels
    cpu_attention = False
    cpu_sampler = False

    def choose_cpu_kernels(self, device: torch.device, cache_dtype: torch.dtype, head_dim: int) -> None:
        """Pick the attention for a cache of this dtype and head size, and the sampler, once, outside any compiled
        region (on CUDA and other devices: nothing to pick): the CPU kernels where they run (the attention reads the cache 1.3-3× faster than the two matmuls or
        SDPA, the sampler is one call instead of ~90: see their modules), the PyTorch expressions elsewhere."""
        if device.type == "cpu":
            from fastgen.kernels import cpu_attention, cpu_sampling
            self.cpu_attention = cpu_attention.unavailable_reason(cache_dtype, head_dim) is None
            self.cpu_sampler = cpu_sampling.unavailable_reason() is None

    def begin_step(self, slots, state, row_offset: int, tables, sinusoid, kv_span: int, text_span: int,
                   positions: torch.Tensor | None = None) -> tuple[torch.Tensor, StepContext]:
        """hidden [2B, D] (the batch's embedded input tokens, in both CFG rows) and the step's context; the cache
        is read up to the host-known spans. ``positions`` [S] int32: each slot's input token's position in the
        cache and the sinusoid, when not ``state.position`` (a melody slot's audio follows its prefix)."""
        positions = state.position if positions is None else positions
        hidden = torch.empty(2 * slots.shape[0], tables.shape[2], dtype=tables.dtype, device=tables.device)
        codebook_embedding_ref(state.tokens, positions, slots, tables, sinusoid, hidden)
        rows = torch.cat([slots, slots + row_offset])
        position = positions[slots].to(torch.int64)
        text_length = torch.cat([state.text_length[slots], torch.zeros_like(slots, dtype=torch.int32)])
        ctx = self.context(rows, torch.cat([position, position]), text_length, kv_span, text_span, tables.dtype)
        ctx.slots = slots
        return hidden, ctx

    def context(self, rows, position, text_length, kv_span: int, text_span: int,
                dtype: torch.dtype = torch.float32) -> StepContext:
        """The context of rows given directly (cache rows [R], positions [R] int64, text lengths [R] int32): the
        attention masks, built once for all layers. For callers that run the decoder outside the engine's slots."""
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
        # host memory: reading it is no sync (and the CPU attention kernel reads rows in place, needing no runs)
        if rows.device.type == "cpu" and not torch.compiler.is_compiling() and not self.cpu_attention:
            row_list = rows.tolist()
            ctx.self_runs = _row_runs(row_list)
            # a row without text (every uncond row) attends to nothing: its output is exactly 0, so it is skipped
            ctx.cross_runs = _row_runs(row_list, keep=[n > 0 for n in text_length.tolist()])
        return ctx

    def self_attention(self, ctx: StepContext, k_cache, v_cache, q, k, v, scale: float) -> torch.Tensor:
        k_cache[ctx.rows, :, ctx.position] = k
        v_cache[ctx.rows, :, ctx.position] = v
        if self.cpu_attention:
            return torch.ops.fastgen_cpu.decode_attention(q, k_cache, v_cache, ctx.rows, ctx.kv_span, ctx.self_bias,
                                                          scale)
        if ctx.self_runs is not None:
            return _attention_over_runs(q, k_cache, v_cache, ctx.self_runs, ctx.kv_span, ctx.self_bias, scale)
        return _gathered_attention(q, k_cache, v_cache, ctx.rows, ctx.kv_span, ctx.self_bias, scale)

    def cross_attention(self, ctx: StepContext, k_cache, v_cache, q, scale: float) -> torch.Tensor:
        if self.cpu_attention:
            # every row, text or not: a row without text (every uncond row) reads cross K/V rows that are never
            # written, so zero, and its all-masked scores average them to exactly 0, as the skipped runs give
            return torch.ops.fastgen_cpu.decode_attention(q, k_cache, v_cache, ctx.rows, ctx.text_span,
                                                          ctx.cross_bias, scale)
        if ctx.cross_runs is not None:
            return _attention_over_runs(q, k_cache, v_cache, ctx.cross_runs, ctx.text_span, ctx.cross_bias, scale)
        return _gathered_attention(q, k_cache, v_cache, ctx.rows, ctx.text_span, ctx.cross_bias, scale)

    def end_step(self, ctx: StepContext, logits, state, pad_id: int, audio_channels: int, dummy_slot: int,
                 hints: SamplerHints = SamplerHints()) -> None:
        """Sample the batch's next tokens from logits [2B, K, V], then advance its positions by one (the dummy slot
        that graph padding points at stays at 0)."""
        st = state
        if self.cpu_sampler and logits.dtype == torch.float32:  # (the projections give float32 logits on a CPU)
            torch.ops.fastgen_cpu.sample_next_tokens(logits, ctx.slots, st.guidance_scale, st.temperature, st.top_k,
                                                     st.top_p, st.seed, st.position, st.num_frames, st.prompt_frames,
                                                     st.tokens, st.codes, st.nonfinite, pad_id, audio_channels,
                                                     dummy_slot)
            return
        sample_next_tokens_ref(logits, ctx.slots, st.guidance_scale, st.temperature, st.top_k, st.top_p, st.seed,
                               st.position, st.num_frames, st.prompt_frames, st.tokens, st.codes, st.nonfinite,
                               pad_id, audio_channels, any_sampling=hints.any_sampling,
                               any_guidance=hints.any_guidance, max_top_k=hints.max_top_k,
                               any_top_p=hints.any_top_p, rows=hints.rows)
        advance_positions_ref(st.position, ctx.slots, dummy_slot)


# more runs than this and one gather of all rows costs less than the per-run calls
MAX_ROW_RUNS = 4


def _row_runs(rows: list[int], keep: list[bool] | None = None) -> list[tuple[int, int, int]] | None:
    """The batch's cache rows as runs (first batch index, first cache row, count) of consecutive rows, leaving out
    rows not kept; None when there are too many runs. A run's K/V are a slice of the cache, a view: the gather
    ``k_cache[rows]`` instead copies every row's keys and values each layer (on a CPU it was a quarter of a
    musicgen-small step at position 250). A request's cond and uncond rows are two runs; a batch of neighbouring
    slots is still two."""
    runs: list[list[int]] = []
    for index, row in enumerate(rows):
        if keep is not None and not keep[index]:
            continue
        if runs and runs[-1][0] + runs[-1][2] == index and runs[-1][1] + runs[-1][2] == row:
            runs[-1][2] += 1
        else:
            runs.append([index, row, 1])
    return [tuple(run) for run in runs] if len(runs) <= MAX_ROW_RUNS else None


def _attention_over_runs(q, k_cache, v_cache, runs, span, bias, scale) -> torch.Tensor:
    """Attention of each run of rows over its slice of the cache; rows in no run get 0."""
    if len(runs) == 1 and runs[0][0] == 0 and runs[0][2] == q.shape[0]:
        _, row, count = runs[0]
        return _attention(q, k_cache[row:row + count, :, :span], v_cache[row:row + count, :, :span], bias, scale)
    out = torch.zeros_like(q)
    for index, row, count in runs:
        out[index:index + count] = _attention(q[index:index + count], k_cache[row:row + count, :, :span],
                                              v_cache[row:row + count, :, :span], bias[index:index + count], scale)
    return out


def _gathered_attention(q, k_cache, v_cache, rows, span, bias, scale) -> torch.Tensor:
    return _attention(q, k_cache[rows, :, :span], v_cache[rows, :, :span], bias, scale)


def _attention(q, keys, values, bias, scale) -> torch.Tensor:
    """q [R, H, Dh] against keys / values [R, H, span, Dh] with an additive bias [R, 1, 1, span]."""
    if torch.compiler.is_compiling() or (q.device.type == "cpu" and q.dtype != torch.float32):
        # spelled out: under torch.compile inductor fuses the scaling, mask and softmax into its own loops (SDPA would
        # stay one opaque call, ~14 µs on a CPU for a tiny model); and on a CPU in bf16, SDPA's single-query path is
        # ~5× slower than these two matmuls (musicgen-small shapes, 1 thread: 5.2 vs 1.0 ms at 1536 keys), with the
        # softmax in fp32 for accuracy. Eagerly in fp32 SDPA is the cheaper call. The keys are copied to a dense
        # block first when they are a slice of the cache: bf16 q·Kᵀ over a strided Kᵀ takes a slow path, 3-8×
        # the copy plus the dense product (16 heads × 256-1472 keys, 1 thread, AMD EPYC); values are read in place.
        if q.device.type == "cpu" and not torch.compiler.is_compiling():
            keys = keys.contiguous()
        scores = torch.matmul(q.unsqueeze(2) * scale, keys.transpose(-1, -2)) + bias
        return torch.matmul(scores.float().softmax(-1).to(values.dtype), values).squeeze(2)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=bias, scale=scale)
    return out.squeeze(2)


class TritonOps:
    name = "triton"

    def __init__(self) -> None:
        # imported here: the kernels need triton's JIT (or TRITON_INTERPRET=1 on a CPU)
        from fastgen.kernels.codebook_embedding import StepRows, codebook_embedding
        from fastgen.kernels.decode_attention import decode_attention, decode_attention_append
        from fastgen.kernels.sampling import sample_next_tokens
        self._embed = codebook_embedding
        self._step_rows = StepRows
        self._attention = decode_attention
        self._attention_append = decode_attention_append
        self._sample = sample_next_tokens

    def choose_cpu_kernels(self, device: torch.device, cache_dtype: torch.dtype, head_dim: int) -> None:
        """Nothing to choose: the Triton kernels run every cache and sampler."""

    def begin_step(self, slots, state, row_offset: int, tables, sinusoid, kv_span: int | None,
                   text_span: int | None, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, StepContext]:
        """One launch: the embedding kernel also writes each row's cache row and attention lengths (the kernels
        read exactly each row's filled cache, so the spans are not needed). ``positions``: as TorchOps.begin_step
        (the sampler then needs the audio positions back in ctx.self_length: ModelRunner.decode_step)."""
        positions = state.position if positions is None else positions
        hidden = torch.empty(2 * slots.shape[0], tables.shape[2], dtype=tables.dtype, device=tables.device)
        rows = self._step_rows.allocate(state.text_length, row_offset, hidden.shape[0])
        self._embed(state.tokens, positions, slots, tables, sinusoid, hidden, rows)
        return hidden, StepContext(rows.cache_row, None, rows.cross_length, slots, self_length=rows.self_length)

    def context(self, rows, position, text_length, kv_span: int | None = None, text_span: int | None = None,
                dtype: torch.dtype | None = None) -> StepContext:
        """The context of rows given directly (as TorchOps.context), for callers outside the engine's slots."""
        return StepContext(rows, position, text_length, self_length=(position + 1).to(torch.int32))

    def self_attention(self, ctx: StepContext, k_cache, v_cache, q, k, v, scale: float) -> torch.Tensor:
        # the kernel writes this step's K/V at position length − 1 itself (no scatter launches)
        return self._attention_append(q, k, v, k_cache, v_cache, ctx.rows, ctx.self_length, scale)

    def cross_attention(self, ctx: StepContext, k_cache, v_cache, q, scale: float) -> torch.Tensor:
        return self._attention(q, k_cache, v_cache, ctx.rows, ctx.text_length, scale)

    def end_step(self, ctx: StepContext, logits, state, pad_id: int, audio_channels: int, dummy_slot: int,
                 hints: SamplerHints | None = None) -> None:
        """One launch: the sampler reads the step's positions from ctx.self_length and advances them itself."""
        st = state
        self._sample(logits, ctx.slots, st.guidance_scale, st.temperature, st.top_k, st.top_p, st.seed, st.position,
                     st.num_frames, st.prompt_frames, st.tokens, st.codes, st.nonfinite, pad_id, audio_channels,
                     step_length=ctx.self_length, dummy_slot=dummy_slot)


Ops = TorchOps | TritonOps


def get_ops(backend: str) -> Ops:
    if backend == "torch":
        return TorchOps()
    if backend == "triton":
        return TritonOps()
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
