"""The model runner: per-slot device state, admission (T5 and the text's cross-attention K/V or a melody model's
prefix: fastgen.engine.conditioning; audio-prompt prefill), the decode step, and retirement (codes out, EnCodec).

Slot s owns cache rows s (cond) and S1 + s (uncond), where S1 = num_slots + 1: the last slot is a dummy that padding
rows point at, so kernels never see an invalid index. Everything a step needs lives in device tensors indexed by
slot, so the step itself is free of host syncs and its shapes depend only on the batch size."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgen.engine.conditioning import SlotConditioning
from fastgen.engine.graphs import DecodeGraphs
from fastgen.engine.request import Request
from fastgen.errors import RequestError
from fastgen.model.codec import AudioCodec, TextEncoder
from fastgen.model.decoder import KVCache, MusicgenDecoder
from fastgen.engine.longform import window_stream_seed
from fastgen.kernels.sampling_ref import RowParams
from fastgen.model.ops import Ops, SamplerHints

KV_BOUND_GRANULE = 64  # the torch backend reads the cache up to the batch's longest row, rounded up to this


@dataclass
class SlotState:
    tokens: torch.Tensor          # [S1, K] int64: current input token per codebook
    position: torch.Tensor        # [S1] int32: delayed position of the current input token
    codes: torch.Tensor           # [S1, K, F_max] int64: prompt + generated codes, delay removed
    guidance_scale: torch.Tensor  # [S1] float32
    temperature: torch.Tensor     # [S1] float32 (0 = greedy)
    top_k: torch.Tensor           # [S1] int32
    top_p: torch.Tensor           # [S1] float32
    seed: torch.Tensor            # [S1] int64
    num_frames: torch.Tensor      # [S1] int32
    prompt_frames: torch.Tensor   # [S1] int32
    text_length: torch.Tensor     # [S1] int32: cond row's text tokens (0 = unconditional)
    nonfinite: torch.Tensor       # [S1] int32
    prefix_length: torch.Tensor   # [S1] int32: a melody slot's prefix, in front of its audio in the cache (else 0)

    @classmethod
    def allocate(cls, slots: int, codebooks: int, max_frames: int, device: torch.device) -> "SlotState":
        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)
        i32, i64, f32 = torch.int32, torch.int64, torch.float32
        return cls(zeros(slots, codebooks, dtype=i64), zeros(slots, dtype=i32),
                   zeros(slots, codebooks, max_frames, dtype=i64), zeros(slots, dtype=f32),
                   zeros(slots, dtype=f32), zeros(slots, dtype=i32), zeros(slots, dtype=f32),
                   zeros(slots, dtype=i64), zeros(slots, dtype=i32), zeros(slots, dtype=i32),
                   zeros(slots, dtype=i32), zeros(slots, dtype=i32), zeros(slots, dtype=i32))


@dataclass(frozen=True)
class BatchPlan:
    slot_ids: torch.Tensor  # [B] int64
    hints: SamplerHints
    text_span: int          # longest text among the batch (torch backend reads this much cross cache)
    bucket: int | None = None  # CUDA-graph bucket when graphs are in use


class ModelRunner:
    def __init__(self, decoder: MusicgenDecoder, text_encoder: TextEncoder, codec: AudioCodec, ops: Ops, *,
                 num_slots: int, max_frames: int, max_text_tokens: int, compile_step: bool = False,
                 steps_per_call: int = 1, max_request_frames: int | None = None, melody=None) -> None:
        """``melody``: a melody model's MelodyPrefix (fastgen.model.melody), with its decoder."""
        self.decoder, self.text_encoder, self.codec, self.ops = decoder, text_encoder, codec, ops
        self.melody = melody
        config = decoder.config
        self.config = config
        self.device = decoder.device
        self.num_slots = num_slots
        self.dummy_slot = num_slots
        self.total_slots = num_slots + 1
        self.max_frames = max_frames  # one slot: a window of a long-form request
        self.max_request_frames = max_request_frames or max_frames
        # a melody slot's audio follows its prefix (chroma and text) in the self-attention cache
        if melody is not None and melody.null_text_tokens > max_text_tokens:
            raise ValueError(f"max_text_tokens={max_text_tokens} is below the {melody.null_text_tokens} tokens of an "
                             "unconditional melody request's text")
        self.prefix_positions = decoder.prefix_positions(max_text_tokens)
        self.max_positions = self.prefix_positions + max_frames + config.channel_codebooks
        self.steps_per_call = steps_per_call
        # a request finishing inside a multi-step call runs on to the call's end: its slot needs the extra positions
        self.cache_positions = self.max_positions + steps_per_call - 1
        self.max_text_tokens = max_text_tokens
        spare = int(compile_step)  # the compiled step's read spans must never equal a cache length (see _compile_step)
        cross_tokens = max_text_tokens if decoder.cross_attention else 0
        self.cache = KVCache.allocate(config, self.total_slots, self.cache_positions + spare,
                                      cross_tokens + spare, decoder.dtype, self.device)
        decoder.reserve_positions(self.cache_positions + spare)  # before the step is compiled or captured
        ops.choose_cpu_kernels(self.device, self.cache.self_k.dtype, config.head_dim)
        self.state = SlotState.allocate(self.total_slots, config.num_codebooks, max_frames, self.device)
        self.conditioning = SlotConditioning(self)
        self.graphs: DecodeGraphs | None = None
        self.compiled = compile_step
        self.eager_step = self.decode_step  # the step where no CUDA graph replays it: decode_step, or compiled
        if compile_step:
            self._compile_step()

    def capture_graphs(self) -> None:
        """Capture the decode step as CUDA graphs, one per batch bucket up to the slot count."""
        self.graphs = DecodeGraphs(self, self.num_slots)
        self.graphs.capture()

    def _compile_step(self) -> None:
        """Run the step through torch.compile from now on, and compile it before serving.

        Eagerly on a CPU, a small model's step costs what its ~190 operator calls cost (a few µs each); inductor turns
        it into a handful of fused C++ loops called from a C++ wrapper instead of Python. The projections keep the paths
        chosen at load: packed weights (oneDNN, fbgemm) run as the custom operator fastgen::opaque_linear, fastgen's GEMV
        and the int8 and int4 kernels as the registered operators they are (fastgen.model.linear). One graph must serve every batch, or a
        recompile (seconds) would stall serving and, past dynamo's limit, the step would silently fall back to eager. So
        sampler hints are not used, the batch size is marked dynamic, and warm-up calls with different read spans make
        dynamo trace the spans as symbols (never 0 or 1, which it specialises, nor the cache length, hence one spare
        cache position); a batch of one, always specialised, gets a graph of its own. Three compiles at start-up (the
        first, with fixed spans, is only a stepping stone): tens of seconds the first time for a tiny model, 3-7 minutes
        for musicgen-small on 2 cores; then inductor's on-disk cache serves later processes. Dynamo also guards on the
        intra-op thread count: see ensure_compiled."""
        options = {"cpp_wrapper": True} if self.device.type == "cpu" else {}
        self.eager_step = torch.compile(self.decode_step, fullgraph=True, options=options)
        self.compiled_for_threads: set[int] = set()
        self.ensure_compiled()

    def ensure_compiled(self) -> None:
        """Compile the step for this thread's intra-op thread count, if not done yet: dynamo guards on it, so a loop
        thread running with another count than the constructing thread (AsyncEngine on a CPU) needs its own graphs."""
        if not self.compiled or torch.get_num_threads() in self.compiled_for_threads:
            return
        text_spans = (2, self.max_text_tokens) if self.max_text_tokens > 2 else (self.max_text_tokens,) * 2
        calls = [(self._compiled_slot_ids([self.dummy_slot] * batch), kv_span, text_span)  # (made as plan() makes
                 for batch, kv_span, text_span in ((2, 3, text_spans[0]),  # them: not inference tensors)
                                                   (2, self.cache_positions, text_spans[1]),
                                                   (1, self.cache_positions, text_spans[1]))]
        # dynamo counts graphs per function, and each compiled engine in the process adds three to decode_step's:
        # lift its recompile limit while compiling, or a third engine would silently run its step eagerly
        limit = max(torch._dynamo.config.recompile_limit, 64)
        try:
            with torch._dynamo.config.patch(recompile_limit=limit), torch.inference_mode():
                for slot_ids, kv_span, text_span in calls:
                    self.eager_step(slot_ids, SamplerHints(), kv_span, text_span)
        except Exception as exc:  # most often: no working C++ compiler for inductor's CPU code
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RuntimeError(f"compile_step=True: torch.compile could not compile the decode step "
                               f"({type(exc).__name__}: {reason[:300]}); use compile_step=False") from exc
        self.compiled_for_threads.add(torch.get_num_threads())

    def _compiled_slot_ids(self, slots: list[int]) -> torch.Tensor:
        slot_ids = torch.tensor(slots, dtype=torch.int64, device=self.device)
        if len(slots) > 1:  # one graph for every batch of two or more (a batch of one has its own)
            torch._dynamo.mark_dynamic(slot_ids, 0)
        return slot_ids

    # ---------------------------------------------------------------------------------------------- admission
    @torch.inference_mode()
    def start(self, requests: list[Request]) -> None:
        """Prepare the slots of newly admitted requests: text (and melody) → the slot's conditioning, audio prompt →
        codes → prefill."""
        if not requests:
            return
        self.conditioning.write(requests)
        for request in requests:
            self._init_slot(request)

    @property
    def text_alone(self) -> bool:
        return self.conditioning.text_alone

    def encode_text(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        """T5 + projection: decoder-width states [T, D] per prompt (the stage worker's job; SlotConditioning)."""
        return self.conditioning.encode_text(token_ids)

    def _init_slot(self, request: Request) -> None:
        st, slot = self.state, request.slot
        p = request.resolved
        st.guidance_scale[slot] = p.guidance_scale
        st.temperature[slot] = p.temperature
        st.top_k[slot] = p.top_k
        st.top_p[slot] = p.top_p
        st.nonfinite[slot] = 0
        codebooks = self.config.num_codebooks
        if request.audio_prompt is not None:
            codes = self.codec.encode(request.audio_prompt)
            if codes.shape[0] != codebooks:
                raise RuntimeError(f"EnCodec produced {codes.shape[0]} codebooks, the decoder expects {codebooks}")
            request.prompt_codes = codes
            request.prompt_frames = codes.shape[1]
            if request.total_frames > self.max_request_frames:  # the submission-time estimate was short
                raise RequestError(f"the audio prompt encodes to {codes.shape[1]} frames; with the requested "
                                   f"length that exceeds the {self.max_request_frames}-frame limit")
            request.plan()  # the exact length may move the window boundaries
        request.window_index, request.done_codes = 0, []
        prompt = None
        if request.prompt_codes is not None:
            offset = request.window.offset  # > 0: a prompt longer than the window, whose first frames are final
            if offset:
                request.done_codes.append(request.prompt_codes[:, :offset])
            prompt = request.prompt_codes[:, offset:].to(self.device)
        self._load_window(request, prompt)

    def _load_window(self, request: Request, prompt: torch.Tensor | None) -> None:
        """Start the slot's current window from ``prompt`` codes [K, p] on the device (None: from BOS): the codes
        buffer, the self-attention cache at positions 0..p−1 (SDPA prefill; cross-attention K/V are not touched), the
        first input token, the window's frame counts and its random stream."""
        st, slot, window = self.state, request.slot, request.window
        prompt_frames = 0 if prompt is None else prompt.shape[1]
        assert prompt_frames == window.prompt_frames, (prompt_frames, window)
        if prompt is not None:
            st.codes[slot, :, :prompt_frames] = prompt
            rows = torch.tensor([slot, self.total_slots + slot], device=self.device)
            delayed = self._delayed_prompt(prompt, prompt_frames + 1)  # positions 0..P
            text_length = torch.stack([st.text_length[slot], torch.zeros_like(st.text_length[slot])])
            self.decoder.prefill(self.cache, rows, delayed[:, :prompt_frames], text_length,
                                 start=request.prefix_length)
            st.tokens[slot] = delayed[:, prompt_frames]
        else:
            st.tokens[slot] = self.config.pad_token_id  # BOS: every codebook starts on the special id
        st.position[slot] = prompt_frames
        st.prompt_frames[slot] = prompt_frames
        st.num_frames[slot] = window.frames
        st.seed[slot] = window_stream_seed(request.resolved.seed, request.window_index)  # kernels' 32-bit seed

    @torch.inference_mode()
    def reprefill(self, request: Request) -> None:
        """Long-form: the request's window is done. The frames before its last window − stride leave the slot for the
        request's host-side codes; the kept ones are prefilled in place as the next window's prompt (positions from
        0, the same text: its cross-attention K/V stay). The slot's other state is rewritten, so a captured graph
        replays it like any other slot."""
        window, following = request.window, request.windows[request.window_index + 1]
        codes = self.state.codes[request.slot, :, :window.frames]
        leaving = following.offset - window.offset
        request.done_codes.append(codes[:, :leaving].to("cpu", copy=True))
        kept = codes[:, leaving:].clone()  # the buffer is rewritten from frame 0
        request.window_index += 1
        self._load_window(request, kept)

    @torch.inference_mode()
    def request_codes(self, request: Request, start: int, end: int) -> torch.Tensor:
        """The running request's codes [K, end − start] (delay removed) for its frames [start, end), counted from its
        first frame across windows, on the device. Frame f is in the slot at f − the window's offset; the frames
        before the offset left the slot at earlier windows' ends for ``done_codes`` (host). A view of the slot when
        every frame is in it: the slot keeps being written, so clone what is kept."""
        offset = request.window.offset
        if not 0 <= start <= end <= request.window.end:
            raise ValueError(f"frames [{start}, {end}) are outside [0, {request.window.end}) of {request.request_id}")
        in_slot = self.state.codes[request.slot, :, max(start, offset) - offset:max(end, offset) - offset]
        if start >= offset:
            return in_slot
        left, first = [], 0  # done_codes: consecutive pieces covering frames [0, offset)
        for piece in request.done_codes:
            last = first + piece.shape[1]
            if first < end and start < last:
                left.append(piece[:, max(start - first, 0):min(end, last) - first])
            first = last
        return torch.cat([torch.cat(left, dim=1).to(self.device), in_slot], dim=1)

    def _delayed_prompt(self, codes: torch.Tensor, positions: int) -> torch.Tensor:
        """Prompt codes [K, P] → delayed tokens [K, positions]: position t of codebook k holds frame t − 1 − c."""
        c = self.config
        codebook = torch.arange(c.num_codebooks, device=codes.device)
        channel_codebook = codebook if c.audio_channels == 1 else codebook // 2
        frame = torch.arange(positions, device=codes.device).view(1, -1) - 1 - channel_codebook.view(-1, 1)
        valid = (frame >= 0) & (frame < codes.shape[1])
        picked = codes.gather(1, frame.clamp(0, codes.shape[1] - 1))
        return torch.where(valid, picked, torch.full_like(picked, c.pad_token_id))

    # ---------------------------------------------------------------------------------------------- decode
    def plan(self, requests: list[Request]) -> "BatchPlan":
        """Host-side facts about the running batch, recomputed only when its membership changes."""
        slots = sorted(r.slot for r in requests)
        if self.graphs is not None:  # the captured step reads everything from device state: only slot ids change
            bucket = self.graphs.set_batch(slots)
            return BatchPlan(self.graphs.slot_ids[:bucket], self.graphs.hints, 0, bucket)
        text_span = max([len(r.text_ids) for r in requests if r.text_ids is not None] or [1])
        if self.compiled:  # one graph for every batch (see _compile_step)
            return BatchPlan(self._compiled_slot_ids(slots), SamplerHints(), min(max(text_span, 2),
                                                                                 self.max_text_tokens))
        params = [r.resolved for r in requests]
        sampling = [p for p in params if p.temperature > 0]
        slot_ids = torch.tensor(slots, dtype=torch.int64, device=self.device)
        st = self.state
        rows = RowParams.gather(slot_ids, st.guidance_scale, st.temperature, st.top_k, st.top_p, st.seed,
                                st.num_frames, st.prompt_frames)
        hints = SamplerHints(any_sampling=bool(sampling),
                             any_guidance=any(p.guidance_scale != 1.0 for p in params),
                             max_top_k=max([p.top_k for p in sampling] or [0]),
                             any_top_p=any(p.top_p < 1.0 for p in sampling), rows=rows)
        return BatchPlan(slot_ids, hints, text_span)

    def kv_span(self, requests: list[Request]) -> int:
        """How much of the self-attention cache the torch backend reads in a call: the longest row after the call's
        steps, rounded up."""
        longest = max(r.prefix_length + r.position for r in requests) + self.steps_per_call
        return min(self.cache_positions, -(-longest // KV_BOUND_GRANULE) * KV_BOUND_GRANULE)

    @torch.inference_mode()
    def step(self, plan: "BatchPlan", requests: list[Request]) -> None:
        """Advance every slot of the batch by ``steps_per_call`` positions: one graph replay, or the same steps run
        eagerly (reading the cache only up to the batch's longest row)."""
        if plan.bucket is not None:
            self.graphs.replay(plan.bucket)
            return
        kv_span = self.kv_span(requests)
        for _ in range(self.steps_per_call):
            self.eager_step(plan.slot_ids, plan.hints, kv_span, plan.text_span)

    def decode_step(self, slot_ids: torch.Tensor, hints: SamplerHints, kv_span: int | None,
                    text_span: int | None) -> None:
        """The step proper, on device tensors only: no host syncs, no data-dependent shapes (CUDA-graph safe).
        Embed (and, on the triton backend, write the rows' bookkeeping), the layers, sample (and advance)."""
        c, decoder, st = self.config, self.decoder, self.state
        positions = None if decoder.cross_attention else st.position + st.prefix_length  # melody: after the prefix
        hidden, ctx = self.ops.begin_step(slot_ids, st, self.total_slots, decoder.embed, decoder.sinusoid,
                                          kv_span, text_span, positions)
        logits = decoder.decode(self.ops, hidden, self.cache, ctx)
        if positions is not None and ctx.self_length is not None:
            # the triton sampler reads the step's positions from the rows' lengths: the audio's, not the cache's
            ctx.self_length = ctx.self_length[:slot_ids.shape[0]] - st.prefix_length[slot_ids]
        self.ops.end_step(ctx, logits, st, c.pad_token_id, c.audio_channels, self.dummy_slot, hints)

    # ---------------------------------------------------------------------------------------------- retire
    @torch.inference_mode()
    def finish(self, requests: list[Request]) -> list[tuple[torch.Tensor, bool]]:
        """Per request: (codes [K, frames] on the CPU, whether any of its logits was non-finite). One device-to-host
        copy for all of them: codes and flags are gathered into one buffer first (each copy is a host sync)."""
        if not requests:
            return []
        slot_ids = torch.tensor([r.slot for r in requests], device=self.device)
        frames = max(r.window.frames for r in requests)  # long-form: the current window
        codes = self.state.codes[slot_ids, :, :frames]  # a gather: a copy, so the slots can be reused at once
        flags = self.state.nonfinite[slot_ids].to(torch.int64)
        packed = torch.cat([codes.flatten(), flags]).to("cpu")
        codes = packed[:codes.numel()].view(codes.shape)
        flags = packed[codes.numel():].tolist()
        bad_rows = [row for r, bad in zip(requests, flags) if bad for row in (r.slot, self.total_slots + r.slot)]
        if bad_rows:  # keep NaNs in these slots' caches from leaking into the next request through masked reads
            self.cache.clear_rows(torch.tensor(bad_rows, device=self.device))
        return [(_with_done_codes(r, codes[i, :, :r.window.frames].contiguous()), bool(bad)) for i, (r, bad) in
                enumerate(zip(requests, flags))]

    @torch.inference_mode()
    def scrub_slot(self, slot: int, always: bool = False) -> bool:
        """The cleanup every other way out of a slot shares (failure, abort): zero the slot's cache rows if its
        request met non-finite logits (or ``always``: an abort or failure may leave NaNs no logit showed yet), so
        they cannot leak into the slot's next request through masked reads. Returns whether logits were
        non-finite. (finish does the same for all the requests finishing in a step at once.)"""
        bad = bool(self.state.nonfinite[slot].item())
        if bad or always:
            self.cache.clear_rows(torch.tensor([slot, self.total_slots + slot], device=self.device))
        return bad

    def decode_audio(self, codes: list[torch.Tensor]):
        return self.codec.decode(codes)


def _with_done_codes(request: Request, window_codes: torch.Tensor) -> torch.Tensor:
    """Long-form: the frames that left the slot at earlier windows' ends come first."""
    return torch.cat(request.done_codes + [window_codes], dim=1) if request.done_codes else window_codes
