"""How requests end: retirement after their last step, EnCodec's results (whole clips and streamed windows), failure
and abort bookkeeping, and the events listeners see. A mixin of Engine (fastgen/engine/engine.py), which owns the
state it reads: runner, scheduler, streamer, stages, listeners, _active, sample_rate."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch

from fastgen.engine.request import GenerationOutput, Request, RequestStatus
from fastgen.errors import RequestFailed

# event kinds passed to listeners: queued, started, progress, audio (a streamed chunk), finished, failed, aborted
Listener = Callable[[Request, str, Any], None]
logger = logging.getLogger("fastgen")


def nonfinite_audio(request: Request) -> RequestFailed:
    return RequestFailed(f"request {request.request_id}: EnCodec produced non-finite audio (NaN/inf); check the "
                         "audio_encoder weights")


class RequestEnding:
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
                    ended += self.fail([request], nonfinite_audio(request))
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
                ended += self.fail([request], nonfinite_audio(request))
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
