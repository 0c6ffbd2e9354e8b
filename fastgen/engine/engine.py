"""The synchronous engine: requests in, one ``step()`` at a time (admit → decode → retire), outputs out.

MusicGen.generate and the CLI run on it; the AsyncEngine drives it from a background thread."""
from __future__ import annotations

import contextlib
import itertools
import logging
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
from fastgen.engine.request import Request, RequestStatus
from fastgen.engine.runner import ModelRunner
from fastgen.engine.retirement import Listener, RequestEnding
from fastgen.engine.scheduler import Scheduler
from fastgen.engine.setup import plan_slots, resolve_backends
from fastgen.errors import QueueFull, RequestAborted, RequestError, RequestFailed
from fastgen.model.musicgen import MusicgenModel
from fastgen.sampling_params import SamplingParams

logger = logging.getLogger("fastgen")


class Engine(RequestEnding):
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
        backends = resolve_backends(config, model.decoder)
        self.ops, linear_backend = backends.ops, backends.linear
        model.decoder.set_linear_backend(linear_backend)  # before graph capture: the graphs record its launches
        num_slots = plan_slots(config, model.decoder, self.slot_frames)
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

    def _submit_text(self) -> None:
        """The prompts queued since the last step go to the stage worker as one T5 batch (one call per request
        would serialise hundreds of small T5 calls ahead of the last admission)."""
        backlog = [r for r in self._text_backlog if r.status == RequestStatus.WAITING]
        self._text_backlog = []
        if backlog:
            self.stages.submit("encode", backlog, [r.text_ids for r in backlog])

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
