"""AsyncEngine: a thread-safe, asyncio-friendly front of the Engine for serving stacks.

One background thread owns the Engine and runs its loop; callers on any thread submit requests (validated at once,
so bad input raises in the caller), stream events, await outputs and abort. Engine state is only ever touched by the
loop thread: submissions and aborts reach it through queues."""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np
import torch

from fastgen.config import EngineConfig
from fastgen.engine.engine import Engine
from fastgen.engine.threads import resolve_cpu_threads
from fastgen.engine.request import GenerationOutput, Request
from fastgen.engine.streaming import StreamConfig
from fastgen.errors import EngineClosed, RequestAborted, RequestError, RequestFailed
from fastgen.model.musicgen import MusicgenModel
from fastgen.sampling_params import SamplingParams

PROGRESS_EVENTS = 50  # at most this many progress events per request
TERMINAL = ("finished", "failed", "aborted")


@dataclass(frozen=True)
class RequestEvent:
    kind: str                       # queued, started, progress, audio (streamed chunk), finished, failed, aborted
    request_id: str
    frames_done: int = 0            # progress: decode steps done / total
    frames_total: int = 0
    output: GenerationOutput | None = None
    error: BaseException | None = None
    audio: np.ndarray | None = None  # audio: float32 [channels, samples], the next piece of the stream


class RequestHandle:
    """Returned by submit(). ``async for event in handle``; ``await handle`` → output; ``handle.result()`` blocks."""

    def __init__(self, request_id: str, engine: "AsyncEngine") -> None:
        self.request_id = request_id
        self._engine = engine
        self._events: list[RequestEvent] = []
        self._changed = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    # called by the loop thread (and by abort, from the caller's)
    def _push(self, event: RequestEvent) -> bool:
        """Record an event and wake every waiter; False (and nothing recorded) once the handle has ended: the first
        terminal event is final (an abort that took effect wins over a finish that raced it)."""
        with self._changed:
            if self._events and self._events[-1].kind in TERMINAL:
                return False
            self._events.append(event)
            waiters, self._waiters = self._waiters, []
            self._changed.notify_all()
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # the waiter's event loop is closed (asyncio.run with wait_for timed out): gone
                pass
        return True

    @property
    def done(self) -> bool:
        with self._changed:
            return bool(self._events) and self._events[-1].kind in TERMINAL

    def _terminal(self) -> RequestEvent:
        event = self._events[-1]
        if event.kind == "finished":
            return event
        raise event.error if event.error is not None else RequestFailed(f"request {self.request_id} {event.kind}")

    def result(self, timeout: float | None = None) -> GenerationOutput:
        with self._changed:
            if not self._changed.wait_for(lambda: self._events and self._events[-1].kind in TERMINAL, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
            return self._terminal().output  # type: ignore[return-value]

    async def _next_change(self, seen: int) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        waiter = (loop, future)
        with self._changed:
            if len(self._events) > seen:
                return
            self._waiters.append(waiter)
        try:
            await future
        finally:  # cancelled (a timeout): leave no waiter behind for a loop that may close
            with self._changed:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def __aiter__(self) -> AsyncIterator[RequestEvent]:
        seen = 0
        while True:
            await self._next_change(seen)
            with self._changed:
                fresh = self._events[seen:]
            seen += len(fresh)
            for event in fresh:
                yield event
                if event.kind in TERMINAL:
                    return

    def stream(self, config: StreamConfig | None = None) -> None:
        """Turn streaming on: "audio" events (``async for event in handle``) then carry the chunks that
        stream_audio yields. A no-op once the request is in EnCodec or done."""
        self._engine._inbox.put(("stream", (self.request_id, config)))
        self._engine._wake.set()

    async def stream_audio(self, config: StreamConfig | None = None) -> AsyncIterator[np.ndarray]:
        """The request's audio while it is generated: float32 [channels, samples] chunks whose concatenation is
        its whole clip (see fastgen/engine/streaming.py; a small first chunk, then about ``interval_s`` each).
        Raises RequestAborted / RequestFailed as awaiting would. Called again, it yields the same chunks; on a
        request that ended without streaming, the whole audio as one chunk."""
        self.stream(config)
        streamed = False
        async for event in self:
            if event.kind == "audio":
                streamed = True
                yield event.audio
        with self._changed:
            output = self._terminal().output
        if not streamed:
            yield output.audio

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self) -> GenerationOutput:
        async for _ in self:
            pass
        with self._changed:
            return self._terminal().output  # type: ignore[return-value]


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


# The loop thread's intra-op threads on a CPU when neither cpu_threads nor $FASTGEN_CPU_THREADS says otherwise:
# OpenMP regions entered from a thread other than the process's first cost ~65 µs each here (vs ~1 µs), which made a
# CPU step ~5× slower than the same step from the main thread; one intra-op thread avoids them.
LOOP_CPU_THREADS = 1


class AsyncEngine:
    def __init__(self, engine: Engine, cpu_threads: int | None = None) -> None:
        """``cpu_threads``: on a CPU, the intra-op thread count the loop thread decodes with (default: the engine's
        own ``cpu_threads``, else $FASTGEN_CPU_THREADS, else 1); the engine records the same number."""
        self.engine = engine
        self.cpu_threads = resolve_cpu_threads(cpu_threads) or engine.cpu_threads or LOOP_CPU_THREADS
        engine.cpu_threads = self.cpu_threads
        # request_id → handle, from submit until the engine ends the request; the ids of those not started yet
        self._handles: dict[str, RequestHandle] = {}
        self._waiting: set[str] = set()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        # guards the registry and orders submissions before the "stop" of a shutdown (never held for real work)
        self._submit_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._died: BaseException | None = None
        engine.listeners.append(self._on_event)
        self._ready = threading.Event()
        self._start_error: Exception | None = None
        self._thread = threading.Thread(target=self._loop, name="fastgen-engine", daemon=True)
        self._thread.start()
        self._ready.wait()  # the loop thread may first compile the step for its thread count
        if self._start_error is not None:
            raise self._start_error

    @classmethod
    def from_pretrained(cls, name_or_path, *, device="cpu", dtype=None, allow_pickle=False,
                        cpu_threads: int | None = None, text_encoder=None, audio_encoder=None,
                        **engine_options: Any) -> "AsyncEngine":
        """``cpu_threads``: as for AsyncEngine (default $FASTGEN_CPU_THREADS, else 1), checked before loading.
        ``text_encoder`` / ``audio_encoder``: for an audiocraft export, its T5 and EnCodec (MusicgenModel.load)."""
        config = EngineConfig(**engine_options)
        cpu_threads = resolve_cpu_threads(cpu_threads, default=LOOP_CPU_THREADS)
        model = MusicgenModel.load(name_or_path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                   quantization=config.quantization, compiled=config.compile_step,
                                   text_encoder=text_encoder, audio_encoder=audio_encoder)
        # the engine is built with the loop thread's count, so a compiled step (compile_step) is compiled for it once
        return cls(Engine(model, config, cpu_threads), cpu_threads)

    # ---------------------------------------------------------------------------------------- caller side
    def submit(self, prompt: str | None, params: SamplingParams | None = None,
               audio_prompt: tuple[Any, int] | None = None, request_id: str | None = None,
               melody: tuple[Any, int] | None = None) -> RequestHandle:
        """Validate and queue a request; returns at once. Raises RequestError for bad input or a request_id in use,
        QueueFull when ``max_waiting`` requests wait already, EngineClosed after shutdown. ``melody``
        (waveform, sample_rate): a MusicGen-Melody checkpoint's melody condition."""
        self._check_open()
        self._check_free(request_id)  # fail fast, before any work (checked again, under the lock, below)
        # validation and the work (bounded first) take no lock of ours: one caller's hostile request cannot stall
        # the others (tokenising alone is serialised, inside make_request)
        request = self.engine.make_request(prompt, params, audio_prompt, request_id, melody=melody)
        with self._submit_lock:
            self._check_open()
            self._check_free(request_id)
            if request_id is None and request.request_id in self._handles:  # the id a caller picked for its own
                request.request_id = self.engine.new_request_id(taken=self._handles)
            handle = RequestHandle(request.request_id, self)
            self._handles[request.request_id] = handle
            self._waiting.add(request.request_id)
            self._inbox.put(("submit", request))  # under the lock: a shutdown's "stop" comes after it
        self._wake.set()
        return handle

    def _check_open(self) -> None:
        if self._died is not None:
            raise EngineClosed(f"the engine loop died ({type(self._died).__name__}: {self._died}); create a new "
                               "engine")
        if self._stopping:
            raise EngineClosed("the engine is shut down")

    def _check_free(self, request_id: str | None) -> None:
        self.engine.check_capacity(len(self._waiting))
        if request_id is not None and request_id in self._handles:
            raise RequestError(f"request_id {request_id!r} is already in use by an unfinished request")

    def abort(self, request_id: str) -> bool:
        """Abort a request. True when it took effect: the handle has ended with RequestAborted (awaiting it raises
        that), and the engine frees its slot before its next step (or drops its audio, if it is in EnCodec). False
        when the request has ended already (finished, failed, aborted) or the id is unknown."""
        with self._submit_lock:
            handle = self._handles.get(request_id)
        if handle is None:
            return False
        if not handle._push(RequestEvent("aborted", request_id, error=RequestAborted(
                f"request {request_id} was aborted"))):
            return False
        self._inbox.put(("abort", request_id))
        self._wake.set()
        return True

    async def shutdown(self) -> None:
        """Stop the loop; requests still queued or running end with RequestAborted, those in EnCodec finish."""
        self._begin_shutdown()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def shutdown_sync(self) -> None:
        self._begin_shutdown()
        self._thread.join()

    def _begin_shutdown(self) -> None:
        with self._submit_lock:  # every submit that got in put its request before this "stop"
            self._stopping = True
            self._inbox.put(("stop", None))
        self._wake.set()

    # ---------------------------------------------------------------------------------------- loop thread
    def _loop(self) -> None:
        if self.engine.device.type == "cpu":  # (see LOOP_CPU_THREADS; the setting is per thread: callers keep theirs)
            torch.set_num_threads(self.cpu_threads)
        try:
            self.engine.runner.ensure_compiled()  # no-op unless compiled for another thread count
        except Exception as exc:  # reported by __init__; the loop never starts
            self._start_error = exc
            return
        finally:
            self._ready.set()
        try:
            self._serve()
        except BaseException as exc:  # a bug of ours: end every request rather than leave them hanging
            self._die(exc)
        finally:
            self.engine.close()

    def _serve(self) -> None:
        while not self._drain_inbox():
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as exc:  # a failure of the batch step: fail the running requests, keep serving
                self.engine.fail(list(self.engine.scheduler.running.values()), exc)
        for request in list(self.engine.scheduler.waiting) + list(self.engine.scheduler.running.values()):
            self.engine.abort(request.request_id)
        while self.engine.has_unfinished():  # requests already in EnCodec finish normally
            self.engine.step()
        self._drain_inbox()  # aborts that came late: all no-ops now

    def _drain_inbox(self) -> bool:
        """Hand every queued submission and abort to the engine, to the end of the inbox; whether a stop was among
        them (the submissions before it are served or aborted, never dropped)."""
        stop = False
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return stop
            if kind == "stop":
                stop = True
            elif kind == "submit":
                try:
                    self.engine.enqueue(payload)
                except Exception as exc:  # submit checked it; should this fail anyway, it fails alone
                    self._on_event(payload, "failed", RequestFailed(f"request {payload.request_id} could not be "
                                                                    f"queued: {type(exc).__name__}: {exc}"))
            elif kind == "stream":
                self.engine.stream(*payload)
            elif kind == "abort":
                # a request's submit always precedes its abort in the inbox; the handle has ended already
                self.engine.abort(payload)

    def _die(self, exc: BaseException) -> None:
        self._died = exc
        with self._submit_lock:
            self._stopping = True
            handles, self._handles = list(self._handles.values()), {}
            self._waiting.clear()
        for handle in handles:
            handle._push(RequestEvent("failed", handle.request_id, error=RequestFailed(
                f"request {handle.request_id} failed: the engine loop died ({type(exc).__name__}: {exc})")))

    def _on_event(self, request: Request, kind: str, payload: Any) -> None:
        handle = self._handles.get(request.request_id)
        if handle is None:
            return
        if kind == "progress":
            done, total = payload
            every = max(1, total // PROGRESS_EVENTS)
            if done % every and done != total:
                return
            handle._push(RequestEvent(kind, request.request_id, done, total))
            return
        if kind == "audio":
            handle._push(RequestEvent(kind, request.request_id, request.steps_done, request.steps_total,
                                      audio=payload))
            return
        if kind == "finished":
            event = RequestEvent(kind, request.request_id, request.steps_done, request.steps_total, output=payload)
        elif kind in ("failed", "aborted"):
            error = payload if isinstance(payload, BaseException) else RequestAborted(str(payload))
            event = RequestEvent(kind, request.request_id, request.steps_done, request.steps_total, error=error)
        else:
            event = RequestEvent(kind, request.request_id, 0, request.steps_total)
        if kind != "queued":
            with self._submit_lock:
                self._waiting.discard(request.request_id)
                if kind in TERMINAL:
                    self._handles.pop(request.request_id, None)
        handle._push(event)
