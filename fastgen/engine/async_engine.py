"""AsyncEngine: a thread-safe, asyncio-friendly front of the Engine for serving stacks.

One background thread owns the Engine and runs its loop; callers on any thread submit requests (validated at once,
so bad input raises in the caller), stream events, await outputs and abort. Engine state is only ever touched by the
loop thread: submissions and aborts reach it through queues."""
from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator

import torch

from fastgen.config import EngineConfig
from fastgen.engine.engine import Engine
from fastgen.engine.request import GenerationOutput, Request
from fastgen.errors import FastgenError, RequestAborted, RequestFailed
from fastgen.model.musicgen import MusicgenModel
from fastgen.sampling_params import SamplingParams

PROGRESS_EVENTS = 50  # at most this many progress events per request
TERMINAL = ("finished", "failed", "aborted")


@dataclass(frozen=True)
class RequestEvent:
    kind: str                       # queued, started, progress, finished, failed, aborted
    request_id: str
    frames_done: int = 0            # progress: decode steps done / total
    frames_total: int = 0
    output: GenerationOutput | None = None
    error: BaseException | None = None


class RequestHandle:
    """Returned by submit(). ``async for event in handle``; ``await handle`` → output; ``handle.result()`` blocks."""

    def __init__(self, request_id: str, engine: "AsyncEngine") -> None:
        self.request_id = request_id
        self._engine = engine
        self._events: list[RequestEvent] = []
        self._changed = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    # called by the loop thread
    def _push(self, event: RequestEvent) -> None:
        with self._changed:
            self._events.append(event)
            waiters, self._waiters = self._waiters, []
            self._changed.notify_all()
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)

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
        with self._changed:
            if len(self._events) > seen:
                return
            self._waiters.append((loop, future))
        await future

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

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self) -> GenerationOutput:
        async for _ in self:
            pass
        with self._changed:
            return self._terminal().output  # type: ignore[return-value]


@contextlib.contextmanager
def _intra_op_threads(count: int | None):
    """torch's intra-op thread count of this thread set to ``count`` (None: unchanged) for the block."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class AsyncEngine:
    def __init__(self, engine: Engine, cpu_threads: int = 1) -> None:
        self.engine = engine
        self.cpu_threads = cpu_threads
        self._handles: dict[str, RequestHandle] = {}
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._submit_lock = threading.Lock()  # tokenizers are not safe to call from several threads at once
        self._wake = threading.Event()
        self._stopping = False
        self._progress_every: dict[str, int] = {}
        engine.listeners.append(self._on_event)
        self._ready = threading.Event()
        self._start_error: Exception | None = None
        self._thread = threading.Thread(target=self._loop, name="fastgen-engine", daemon=True)
        self._thread.start()
        self._ready.wait()  # the loop thread may first compile the step for its thread count
        if self._start_error is not None:
            raise self._start_error

    @classmethod
    def from_pretrained(cls, name_or_path, *, device="cpu", dtype=None, allow_pickle=False, cpu_threads: int = 1,
                        **engine_options: Any) -> "AsyncEngine":
        config = EngineConfig(**engine_options)
        model = MusicgenModel.load(name_or_path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                   quantization=config.quantization)
        # built with the loop thread's thread count, so a compiled step (compile_step) is compiled for it once
        with _intra_op_threads(cpu_threads if model.decoder.device.type == "cpu" else None):
            engine = Engine(model, config)
        return cls(engine, cpu_threads)

    # ---------------------------------------------------------------------------------------- caller side
    def submit(self, prompt: str | None, params: SamplingParams | None = None,
               audio_prompt: tuple[Any, int] | None = None, request_id: str | None = None) -> RequestHandle:
        """Validate and queue a request; returns at once. Raises RequestError for bad input."""
        if self._stopping:
            raise FastgenError("the engine is shut down")
        with self._submit_lock:
            if request_id is not None and request_id in self._handles:
                raise FastgenError(f"request_id {request_id!r} is already in use")
            request = self.engine.make_request(prompt, params, audio_prompt, request_id)
            handle = RequestHandle(request.request_id, self)
            self._handles[request.request_id] = handle
        self._inbox.put(("submit", request))
        self._wake.set()
        return handle

    def abort(self, request_id: str) -> None:
        """Abort a request: its slot is freed before the next decode step; awaiting it raises RequestAborted."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    async def shutdown(self) -> None:
        """Stop the loop; requests still queued or running end with RequestAborted."""
        self._stopping = True
        self._inbox.put(("stop", None))
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def shutdown_sync(self) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        self._wake.set()
        self._thread.join()

    # ---------------------------------------------------------------------------------------- loop thread
    def _loop(self) -> None:
        if self.engine.device.type == "cpu":
            # OpenMP regions entered from a thread other than the process's first cost ~65 µs each here (vs ~1 µs),
            # which made a CPU step ~5× slower than the same step from the main thread; one intra-op thread avoids
            # them (the setting is per thread: the caller's threads keep theirs)
            torch.set_num_threads(self.cpu_threads)
        try:
            self.engine.runner.ensure_compiled()  # no-op unless compiled for another thread count
        except Exception as exc:  # reported by __init__; the loop never starts
            self._start_error = exc
            return
        finally:
            self._ready.set()
        stop = False
        while not stop:
            stop = self._drain_inbox()
            if stop:
                break
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as exc:  # a failure of the batch step: fail the running requests, keep serving
                running = list(self.engine.scheduler.running.values())
                self.engine.fail(running, exc)
        for request in list(self.engine.scheduler.waiting) + list(self.engine.scheduler.running.values()):
            self.engine.abort(request.request_id)
        while self.engine.has_unfinished():  # requests already in EnCodec finish normally
            self.engine.step()
        self.engine.close()

    def _drain_inbox(self) -> bool:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return False
            if kind == "stop":
                return True
            if kind == "submit":
                self.engine.enqueue(payload)
            elif kind == "abort":
                # a request's submit always precedes its abort in the inbox; one not found has finished or is
                # already in EnCodec, and ends normally
                self.engine.abort(payload)

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
        if kind == "finished":
            event = RequestEvent(kind, request.request_id, request.steps_done, request.steps_total, output=payload)
        elif kind in ("failed", "aborted"):
            error = payload if isinstance(payload, BaseException) else RequestAborted(str(payload))
            event = RequestEvent(kind, request.request_id, request.steps_done, request.steps_total, error=error)
        else:
            event = RequestEvent(kind, request.request_id, 0, request.steps_total)
        handle._push(event)
        if kind in TERMINAL:
            with self._submit_lock:
                self._handles.pop(request.request_id, None)
