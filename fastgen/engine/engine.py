"""The synchronous engine: requests in, one ``step()`` at a time (admit → decode → retire), outputs out.

MusicGen.generate and the CLI run on it; the AsyncEngine drives it from a background thread."""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

from fastgen.config import EngineConfig, FrameLimits
from fastgen.engine.graphs import DecodeGraphs
from fastgen.engine.intake import RequestIntake
from fastgen.engine.stage_worker import StageWorker
from fastgen.engine.threads import intra_op_threads, resolve_cpu_threads
from fastgen.engine.streaming import AudioStreamer, StreamConfig
from fastgen.engine.request import GenerationOutput, Request, RequestStatus
from fastgen.engine.runner import ModelRunner
from fastgen.engine.scheduler import Scheduler
from fastgen.errors import QueueFull, RequestAborted, RequestError, RequestFailed
from fastgen.model.decoder import KVCache
from fastgen.model.musicgen import MusicgenModel
from fastgen.model.ops import get_ops
from fastgen.sampling_params import SamplingParams

# event kinds passed to listeners: queued, started, progress, audio (a streamed chunk), finished, failed, aborted
Listener = Callable[[Request, str, Any], None]
CPU_CACHE_BUDGET = 2 << 30
CUDA_CACHE_SHARE = 0.75  # of the memory free after loading the weights; the rest: graphs, EnCodec, T5
MAX_SLOTS = 256
logger = logging.getLogger("fastgen")


class Engine:
    def __init__(self, model: MusicgenModel, config: EngineConfig = EngineConfig(),
                 cpu_threads: int | None = None) -> None:
        """``cpu_threads``: on a CPU, the intra-op thread count step() runs with (default $FASTGEN_CPU_THREADS, else
        the calling thread's count); recorded as ``self.cpu_threads``."""
        self.model = model
        self.config = config
        self.device = model.decoder.device
        self.cpu_threads = resolve_cpu_threads(cpu_threads)
        if config.quantization is not None and config.quantization != model.decoder.quantization:
            raise ValueError(f"quantization={config.quantization!r} but the model was loaded without it: pass it "
                             "to from_pretrained (or MusicgenModel.load), which quantises at load")
        mc = model.config
        self.frame_rate, self.sample_rate = mc.frame_rate, mc.sample_rate
        # long-form: requests up to max_frames slide over windows of window_frames; a slot holds one window, or the
        # longest request when that is shorter
        limits = FrameLimits.of(mc, config)  # (MusicGen.inspect checks jobs by the same rule)
        self.window_frames, self.max_frames, self.slot_frames = limits.window, limits.request, limits.slot
        backend = config.backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        if backend == "triton" and self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1, Triton's slow CPU "
                             "interpreter, for testing); use backend='torch' or 'auto' on a CPU")
        if backend == "triton" and self.device.type != "cuda" and model.decoder.dtype != torch.float32:
            raise ValueError(f"backend='triton' on a CPU runs Triton's interpreter, which computes "
                             f"{str(model.decoder.dtype).removeprefix('torch.')} wrongly; load with dtype=float32")
        self.ops = get_ops(backend)
        linear_backend = config.linear_backend
        if linear_backend is None:
            linear_backend = "triton" if backend == "triton" and self.device.type == "cuda" else "torch"
        if linear_backend == "triton" and backend != "triton":
            raise ValueError(f"linear_backend='triton' needs backend='triton', but backend resolved to {backend!r} "
                             f"on {self.device.type}: the fused projections are Triton kernels")
        if config.compile_step and backend != "torch":
            raise ValueError(f"compile_step applies to the torch backend (the CPU default), not {backend!r}: the "
                             "Triton kernels are compiled already and run as CUDA graphs")
        model.decoder.set_linear_backend(linear_backend)  # before graph capture: the graphs record its launches
        num_slots = self._plan_slots()
        with self._threads():  # a compiled step is compiled for the thread count it will run with
            self.runner = ModelRunner(model.decoder, model.text_encoder, model.codec, self.ops, num_slots=num_slots,
                                      max_frames=self.slot_frames, max_text_tokens=config.max_text_tokens,
                                      compile_step=config.compile_step, steps_per_call=config.steps_per_call,
                                      max_request_frames=self.max_frames, melody=model.melody)
        self.scheduler = Scheduler(num_slots)
        if linear_backend == "triton":  # split-K scratch for the most rows a step runs, before any graph capture
            model.decoder.reserve_fused_scratch(2 * self.runner.total_slots)
        if self.ops.name == "triton" and not config.enforce_eager and DecodeGraphs.supported(self.device):
            self.runner.capture_graphs()  # CUDA; on a CPU only under fastgen.engine.graph_standin.cpu_graphs()
        threaded = config.overlap_stages if config.overlap_stages is not None else self.device.type == "cuda"
        self.streamer = AudioStreamer(self.runner.request_codes, self.runner.decode_audio,
                                      mc.sample_rate // mc.frame_rate, mc.frame_rate)
        self.stages = StageWorker({"encode": self.runner.encode_text, "decode": self.runner.decode_audio,
                                   "stream": self.streamer.decode}, self.device, threaded)
        self.listeners: list[Listener] = []
        self._plan, self._plan_version = None, -1  # the running batch's BatchPlan, for scheduler.version
        self._text_backlog: list[Request] = []  # queued prompts whose T5 batch goes to the stage worker next step
        self._ids = itertools.count()
        self._active: dict[str, Request] = {}  # request_id → request, from enqueue until it ends (any way)
        self.intake = RequestIntake(model, window_frames=self.window_frames, max_frames=self.max_frames,
                                    max_text_tokens=config.max_text_tokens)

    @classmethod
    def from_pretrained(cls, name_or_path, *, device: str | torch.device = "cpu", dtype=None,
                        allow_pickle: bool = False, cpu_threads: int | None = None, text_encoder=None,
                        audio_encoder=None, **engine_options) -> "Engine":
        """``text_encoder`` / ``audio_encoder``: for an audiocraft export, its T5 and EnCodec (MusicgenModel.load)."""
        config = EngineConfig(**engine_options)  # validated before any loading
        cpu_threads = resolve_cpu_threads(cpu_threads)
        model = MusicgenModel.load(name_or_path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                   quantization=config.quantization, compiled=config.compile_step,
                                   text_encoder=text_encoder, audio_encoder=audio_encoder)
        return cls(model, config, cpu_threads)

    def _threads(self) -> contextlib.AbstractContextManager:
        return intra_op_threads(self.cpu_threads if self.device.type == "cpu" else None)

    def _plan_slots(self) -> int:
        """As many slots as the KV-cache budget holds, each sized for one window (or the longest request allowed)."""
        dec = self.model.decoder
        positions = (dec.prefix_positions(self.config.max_text_tokens) + self.slot_frames
                     + dec.config.channel_codebooks + self.config.steps_per_call - 1)
        cross_tokens = self.config.max_text_tokens if dec.cross_attention else 0
        per_slot = KVCache.bytes_per_slot(dec.config, positions, cross_tokens, dec.dtype)
        budget = self.config.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * CUDA_CACHE_SHARE)
            else:
                budget = CPU_CACHE_BUDGET
        fits = budget // per_slot - 1  # one slot's worth goes to the padding dummy
        cap = self.config.max_slots or MAX_SLOTS
        if fits < 1:
            raise ValueError(f"the KV-cache budget ({budget / 2**30:.2f} GiB) cannot hold one slot of "
                             f"{per_slot / 2**30:.2f} GiB; lower window_s, max_duration_s or max_text_tokens, or raise "
                             "kv_cache_memory_bytes")
        return int(min(cap, fits))

    @property
    def num_slots(self) -> int:
        return self.runner.num_slots

    # ------------------------------------------------------------------------------------------------ requests
    def make_request(self, prompt: str | None, params: SamplingParams | None = None,
                     audio_prompt: tuple[Any, int] | None = None, request_id: str | None = None,
                     name: str = "prompt", codes_prompt: Any = None, melody: tuple[Any, int] | None = None) -> Request:
        """Validate and build a request (raises RequestError naming the bad parameter); does not queue it. Safe from
        any thread (fastgen.engine.intake). ``melody`` (waveform, sample_rate): a melody checkpoint's condition."""
        self.intake.check_request_id(request_id)
        return self.intake.build(request_id if request_id is not None else self.new_request_id(), prompt, params,
                                 audio_prompt, name, codes_prompt, melody)

    def new_request_id(self, taken: Any = ()) -> str:
        """An automatic id, never one in use (a caller may have picked "req-7" for its own)."""
        while True:
            rid = f"req-{next(self._ids)}"
            if rid not in self._active and rid not in taken:
                return rid

    def add_request(self, prompt: str | None, params: SamplingParams | None = None,
                    audio_prompt: tuple[Any, int] | None = None, request_id: str | None = None,
                    codes_prompt: Any = None, melody: tuple[Any, int] | None = None) -> Request:
        """Validate and queue a request. Raises RequestError for bad input or a request_id in use, and QueueFull
        (before any work) when ``max_waiting`` requests are waiting already."""
        self.check_capacity(len(self.scheduler.waiting))
        if request_id is not None and request_id in self._active:
            raise RequestError(f"request_id {request_id!r} is already in use by an unfinished request")
        request = self.make_request(prompt, params, audio_prompt, request_id, codes_prompt=codes_prompt,
                                    melody=melody)
        self.enqueue(request)
        return request

    def check_capacity(self, waiting: int) -> None:
        """Raise QueueFull when ``waiting`` requests fill the waiting queue."""
        bound = self.config.max_waiting
        if bound is not None and waiting >= bound:
            raise QueueFull(f"the waiting queue is full: {waiting} requests wait to start, max_waiting={bound}; "
                            "retry later, or raise EngineConfig.max_waiting")

    def enqueue(self, request: Request) -> None:
        if request.request_id in self._active:
            raise RequestError(f"request_id {request.request_id!r} is already in use by an unfinished request")
        self._active[request.request_id] = request
        self.scheduler.add(request)
        if self.stages.threaded and request.text_ids is not None:  # T5 runs ahead while the decoder steps
            request.text_pending = True
            self._text_backlog.append(request)
        self._emit(request, "queued", None)

    def abort(self, request_id: str) -> bool:
        """End an unfinished request with RequestAborted: a waiting or running one leaves its slot at once (free for
        the next step); one in EnCodec has its audio dropped when it comes back. True when it took effect; False
        when no such request is unfinished (unknown, or finished, failed or aborted already)."""
        request = self._active.get(request_id)
        if request is None:
            return False
        self._leave_slot(request, RequestStatus.ABORTED)
        self.streamer.drop(request)
        self._end(request, RequestStatus.ABORTED, "aborted", RequestAborted(f"request {request_id} was aborted"))
        return True

    def stream(self, request_id: str, config: StreamConfig | None = None) -> bool:
        """Stream a waiting or running request's audio as it is generated: "audio" events carry float32 [channels,
        samples] chunks, the last one before "finished" (see fastgen/engine/streaming.py). False if the request is
        not waiting or running (or streams already)."""
        request = self.scheduler.find(request_id)
        return request is not None and self.streamer.start(request, config)

    def stream_audio(self, request: Request, config: StreamConfig | None = None) -> Iterator[np.ndarray]:
        """The synchronous engine's stream: steps the engine (all requests advance) and yields ``request``'s chunks
        as they are decoded; raises its error if it fails or is aborted. A request that already finished yields
        its whole audio at once."""
        chunks: list[np.ndarray] = []

        def listen(r: Request, kind: str, payload: Any) -> None:
            if r is request and kind == "audio":
                chunks.append(payload)
        self.listeners.append(listen)
        try:
            self.stream(request.request_id, config)
            streaming = self.streamer.streaming(request)  # (chunks emitted before this call are not repeated)
            while not request.status.done and self.has_unfinished():
                self.step()
                yield from chunks
                chunks.clear()
            yield from chunks
        finally:
            self.listeners.remove(listen)
        if request.status != RequestStatus.FINISHED:
            raise request.error or RequestFailed(f"request {request.request_id} ended as {request.status.value}")
        if not streaming:
            yield request.output.audio

    def _leave_slot(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the waiting queue or its slot, with the slot's cleanup (shared by abort and
        failure; a finished request's goes through runner.finish)."""
        if request.status == RequestStatus.RUNNING and request.slot is not None:
            self.runner.scrub_slot(request.slot, always=True)
        if request.status in (RequestStatus.WAITING, RequestStatus.RUNNING):
            self.scheduler.release(request, status)

    def _end(self, request: Request, status: RequestStatus, kind: str, payload: Any) -> None:
        self._active.pop(request.request_id, None)
        request.status = status
        if isinstance(payload, Exception):
            request.error = payload
        request.finish_time = time.perf_counter()
        self._emit(request, kind, payload)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.stages.pending > 0

    def close(self) -> None:
        """Stop the stage worker thread (if any)."""
        self.stages.close()

    # ------------------------------------------------------------------------------------------------ the loop
    def step(self) -> list[Request]:
        """Admit what fits, advance every running request by ``steps_per_call`` positions (one graph replay on CUDA;
        admissions, aborts and retirements happen between calls), retire what finished. Returns the
        requests that ended since the last step (finished or failed), outputs attached. On a CPU it runs with
        ``cpu_threads`` intra-op threads (when set)."""
        with self._threads():
            return self._step()

    def _step(self) -> list[Request]:
        self._submit_text()
        ended = self._collect_stages(block=not self.scheduler.running and not self.scheduler.has_ready())
        ended += self._admit()
        if self.scheduler.running:
            running = list(self.scheduler.running.values())
            if self._plan is None or self._plan_version != self.scheduler.version:
                self._plan, self._plan_version = self.runner.plan(running), self.scheduler.version
            now = time.perf_counter()
            for request in running:
                if request.first_step_time is None:
                    request.first_step_time = now
            self.runner.step(self._plan, running)
            done, window_ends = self.scheduler.advance(self.config.steps_per_call)
            windows = (self.streamer.due([r for r in running if r.steps_done < r.steps_total])
                       if self.streamer.active else [])
            if windows:
                self.stages.submit("stream", [w.request for w in windows], windows)
            if window_ends:  # after the streamer has read the finished window's codes from the slot
                ended += self._next_windows(window_ends)
            if self.listeners:
                for request in running:
                    self._emit(request, "progress", (request.steps_done, request.steps_total))
            ended += self._retire(done)
            if not self.stages.threaded:
                ended += self._collect_stages()
        return ended

    def _admit(self) -> list[Request]:
        admitted = self.scheduler.admit()
        if not admitted:
            return []
        try:
            self.runner.start(admitted)
        except Exception as exc:  # isolate: retry one by one so one bad request fails alone
            if len(admitted) == 1:
                return self.fail(admitted, exc)
            failed = []
            for request in admitted:
                try:
                    self.runner.start([request])
                except Exception as single_exc:
                    failed += self.fail([request], single_exc)
            admitted = [r for r in admitted if r.status == RequestStatus.RUNNING]
            for request in admitted:
                self._emit(request, "started", None)
            return failed
        for request in admitted:
            self._emit(request, "started", None)
        return []

    def _next_windows(self, requests: list[Request]) -> list[Request]:
        """Long-form: re-prefill the slots of requests whose window ended with their last kept frames (between two
        calls, eagerly; a captured graph reads everything from slot state and just continues)."""
        failed = []
        for request in requests:
            try:
                self.runner.reprefill(request)
            except Exception as exc:  # one request's failure stays its own
                failed += self.fail([request], exc)
        self._plan_version = -1  # the eager plan holds per-slot rows (frames, seeds) gathered from slot state
        return failed

    def _retire(self, done: list[Request]) -> list[Request]:
        """Free the slots of requests whose last step this was and hand their codes to EnCodec (on a side thread
        and stream on CUDA, so the decode loop goes on)."""
        if not done:
            return []
        finished, codes = [], []
        failed: list[Request] = []
        for request, (request_codes, nonfinite) in zip(done, self.runner.finish(done)):  # (scrubs bad slots)
            self.scheduler.release(request, RequestStatus.DECODING)
            if nonfinite:
                failed += self.fail([request], RequestFailed(
                    f"request {request.request_id} produced non-finite logits (NaN/inf); check the model "
                    "weights and dtype (float16 can overflow)"), release=False)
            else:
                finished.append(request)
                codes.append(request_codes)
        # a streamed request ends with its last window (its output audio is the stream); the others decode whole
        windows = [w for w in (self.streamer.final(r, c) for r, c in zip(finished, codes)) if w is not None]
        if windows:
            self.stages.submit("stream", [w.request for w in windows], windows)
        whole = [(r, c) for r, c in zip(finished, codes) if not any(w.request is r for w in windows)]
        if whole:
            self.stages.submit("decode", [r for r, _ in whole], [c for _, c in whole])
        return failed

    def _submit_text(self) -> None:
        """The prompts queued since the last step go to the stage worker as one T5 batch (one call per request
        would serialise hundreds of small T5 calls ahead of the last admission)."""
        backlog = [r for r in self._text_backlog if r.status == RequestStatus.WAITING]
        self._text_backlog = []
        if backlog:
            self.stages.submit("encode", backlog, [r.text_ids for r in backlog])

    def _collect_stages(self, block: bool = False) -> list[Request]:
        """Take in the stage worker's finished jobs: prefetched text states, and audio of finished requests."""
        ended: list[Request] = []
        for job in self.stages.collect(block=block):
            if job.kind == "encode":
                waiting = [r for r in job.requests if r.status == RequestStatus.WAITING]  # not aborted meanwhile
                if job.error is not None and len(waiting) > 1:  # isolate: encode them one by one
                    for request in waiting:
                        self.stages.submit("encode", [request], [request.text_ids])
                    continue
                for request, states in zip(job.requests, job.result or [None] * len(job.requests)):
                    request.text_pending = False
                    if request.status != RequestStatus.WAITING:
                        continue
                    if job.error is not None:
                        ended += self.fail([request], job.error)
                    else:
                        request.text_states, request.text_ready = states, job.ready
                continue
            if job.kind == "stream":
                ended += self._stream_chunks(job)
                continue
            live = [(r, c, i) for i, (r, c) in enumerate(zip(job.requests, job.inputs))
                    if r.status == RequestStatus.DECODING]  # not aborted while in EnCodec
            if job.error is not None:
                if len(job.requests) > 1:  # isolate, as admission does: one by one, so a bad request fails alone
                    for request, request_codes, _ in live:
                        self.stages.submit("decode", [request], [request_codes])
                else:
                    ended += self.fail([r for r, _, _ in live], job.error)
                continue
            for request, request_codes, i in live:
                wave = job.result[i]
                if not np.isfinite(wave).all():
                    ended += self.fail([request], RequestFailed(
                        f"request {request.request_id}: EnCodec produced non-finite audio (NaN/inf); check the "
                        "audio_encoder weights"))
                    continue
                request.finish_time = time.perf_counter()
                request.output = self._output(request, request_codes, wave)
                self._end(request, RequestStatus.FINISHED, "finished", request.output)
                ended.append(request)
        return ended

    def _stream_chunks(self, job) -> list[Request]:
        """Hand out a "stream" job's chunks; a request's last window ends it, its stream being its output audio."""
        live = [w for w in job.inputs if not w.request.status.done]  # aborted or failed meanwhile: nothing to send
        if job.error is not None:
            return self.fail([w.request for w in live], job.error)
        ended = []
        for window, chunk in zip(job.inputs, job.result):
            request = window.request
            if request.status.done:
                continue
            if not np.isfinite(chunk).all():
                ended += self.fail([request], RequestFailed(
                    f"request {request.request_id}: EnCodec produced non-finite audio (NaN/inf); check the "
                    "audio_encoder weights"))
                continue
            self._emit(request, "audio", chunk)
            if window.emit_to is None:  # the last window
                request.output = self._output(request, window.all_codes, window.state.whole())
                self._end(request, RequestStatus.FINISHED, "finished", request.output)
                ended.append(request)
        return ended

    def fail(self, requests: list[Request], exc: Exception, release: bool = True) -> list[Request]:
        """End ``requests`` with RequestFailed (freeing and cleaning their slots); the engine goes on serving the
        rest. Requests that have ended already (aborted meanwhile) are left as they are."""
        failed = []
        for request in requests:
            if request.status.done:
                continue
            if release:
                self._leave_slot(request, RequestStatus.FAILED)
            self.streamer.drop(request)
            error = exc if isinstance(exc, RequestFailed) else RequestFailed(
                f"request {request.request_id} failed: {type(exc).__name__}: {exc}")
            if error is not exc:
                error.__cause__ = exc
            self._end(request, RequestStatus.FAILED, "failed", error)
            failed.append(request)
        return failed

    def _output(self, request: Request, codes: torch.Tensor, audio: np.ndarray) -> GenerationOutput:
        timings = {"queue_s": (request.first_step_time or request.arrival_time) - request.arrival_time,
                   "total_s": (request.finish_time or time.perf_counter()) - request.arrival_time}
        return GenerationOutput(request.request_id, request.prompt, audio, self.sample_rate,
                                codes.numpy().astype(np.int64), request.resolved.seed, request.prompt_frames, timings)

    def _emit(self, request: Request, kind: str, payload: Any) -> None:
        for listener in self.listeners:
            try:
                listener(request, kind, payload)
            except Exception:  # a listener's bug must not leave the engine half-way through a state change
                logger.exception("fastgen: listener %r failed on %s event of %s", listener, kind, request.request_id)

    # ------------------------------------------------------------------------------------------------ batch
    def run(self, requests: list[Request], progress: Callable[[int], None] | None = None) -> list[Request]:
        """Queue ``requests`` and step until all have ended (the engine must be otherwise idle)."""
        for request in requests:
            self.enqueue(request)
        try:
            while self.has_unfinished():
                ended = self.step()
                if progress is not None and ended:
                    progress(len(ended))
        except BaseException:  # (KeyboardInterrupt too) leave no request of ours holding a slot or queued
            for request in requests:
                if not request.status.done:
                    self.abort(request.request_id)
            raise
        return requests
