"""The stages around the decoder, off the decode loop: T5 for queued prompts, EnCodec for finished requests.

With ``threaded=True`` (the default on CUDA) one worker thread runs them on its own CUDA stream while the loop keeps
stepping the decoder; the loop collects finished jobs at its next step. Inline mode runs a job at once in the caller's
thread. The results are the same up to float rounding: T5 and EnCodec hold no state between calls."""
from __future__ import annotations

import queue
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class StageJob:
    kind: str                  # "encode" (text ids → decoder-width states) or "decode" (codes → audio)
    requests: list             # the requests the job serves
    inputs: Any
    result: Any = None
    error: Exception | None = None
    ready: Any = None          # CUDA event recorded on the worker's stream after the work (threaded, CUDA)


class StageWorker:
    def __init__(self, work: dict[str, Callable[[Any], Any]], device: torch.device, threaded: bool) -> None:
        self._work_fns = work
        self._device = device
        self.threaded = threaded
        self._jobs: queue.SimpleQueue[StageJob | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[StageJob] = queue.SimpleQueue()
        self.pending = 0  # jobs submitted and not yet collected (touched by the loop thread only)
        self.completed: Counter[str] = Counter()  # collected jobs by kind
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="fastgen-stages", daemon=True)
            self._thread.start()

    def submit(self, kind: str, requests: list, inputs: Any) -> None:
        job = StageJob(kind, requests, inputs)
        self.pending += 1
        if self.threaded:
            self._jobs.put(job)
        else:
            self._work(job)
            self._done.put(job)

    def collect(self, block: bool = False) -> list[StageJob]:
        """Jobs finished since the last call; with ``block``, wait for at least one if any is pending."""
        jobs = []
        if block and self.pending:
            jobs.append(self._done.get())
        while True:
            try:
                jobs.append(self._done.get_nowait())
            except queue.Empty:
                break
        self.pending -= len(jobs)
        self.completed.update(job.kind for job in jobs)
        return jobs

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()

    def _run(self) -> None:
        stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        if stream is None:
            torch.set_num_threads(1)  # per thread; OpenMP regions off the main thread are slow (see AsyncEngine)
        while (job := self._jobs.get()) is not None:
            if stream is not None:
                with torch.cuda.stream(stream):
                    self._work(job)
                    job.ready = torch.cuda.Event()
                    job.ready.record(stream)
            else:
                self._work(job)
            self._done.put(job)

    def _work(self, job: StageJob) -> None:
        try:
            job.result = self._work_fns[job.kind](job.inputs)
        except Exception as exc:  # reported per job; the worker keeps going
            job.error = exc
