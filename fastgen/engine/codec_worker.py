"""EnCodec decoding of finished requests, off the decode loop.

With ``threaded=True`` (the default on CUDA) a worker thread decodes on its own CUDA stream while the loop keeps
stepping the decoder; finished jobs are collected by the loop at its next step. Inline mode decodes at once, in the
caller's thread. Either way the audio is the same: EnCodec's forward holds no state, and its inputs are CPU codes."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass
class DecodeJob:
    requests: list          # the requests whose codes these are
    codes: list[torch.Tensor]
    audio: list[np.ndarray] | None = None
    error: Exception | None = None


class CodecWorker:
    def __init__(self, decode: Callable[[list[torch.Tensor]], list[np.ndarray]], device: torch.device,
                 threaded: bool) -> None:
        self._decode = decode
        self._device = device
        self.threaded = threaded
        self._jobs: queue.SimpleQueue[DecodeJob | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[DecodeJob] = queue.SimpleQueue()
        self.pending = 0  # jobs submitted and not yet collected (touched by the loop thread only)
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="fastgen-codec", daemon=True)
            self._thread.start()

    def submit(self, requests: list, codes: list[torch.Tensor]) -> None:
        job = DecodeJob(requests, codes)
        self.pending += 1
        if self.threaded:
            self._jobs.put(job)
        else:
            self._work(job)
            self._done.put(job)

    def collect(self, block: bool = False) -> list[DecodeJob]:
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
            else:
                self._work(job)
            self._done.put(job)

    def _work(self, job: DecodeJob) -> None:
        try:
            job.audio = self._decode(job.codes)  # returns host arrays: the stream's work is complete
        except Exception as exc:  # reported per job; the worker keeps going
            job.error = exc
