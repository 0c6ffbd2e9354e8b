"""The grace period of an interrupted job. After the first SIGINT/SIGTERM nothing new is admitted and the running
requests get ``--grace`` seconds of wall time, counted from the signal, to finish and be written. Between engine
steps Grace decides whether they go on:

* a second signal cuts them at once;
* once the deadline has passed, they are cut;
* before it, they are cut as soon as none of them can finish in time any more: the one closest to its end needs
  (its steps left × the recent step time) + EnCodec for it (measured on the outputs finished so far) > the time left.
  So the job lets the running requests finish when it can tell they will, and otherwise stops at once instead of
  waiting out a grace period that cannot help (and overrunning it by a final step and EnCodec).

Outputs that finished are always written, cut or not; cut ones leave no file."""
from __future__ import annotations

import math
import signal
import statistics
import time
from collections import deque
from typing import Any

RECENT_STEPS = 15  # the recent step time: the median of this many (robust to a step slowed by another process)
EMA = 0.3  # weight of the newest retirement in what finishing costs


def signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum).name  # type: ignore[arg-type]
    except ValueError:
        return str(signum)


class Grace:
    def __init__(self, stop: Any, grace_s: float, engine: Any) -> None:
        self.stop, self.grace_s, self.engine = stop, grace_s, engine
        self._steps: deque[float] = deque(maxlen=RECENT_STEPS)  # wall times of recent steps in which nothing ended
        self.finish_s_per_frame: float | None = None  # what finishing adds to a step (EnCodec), per frame decoded
        self.reason: str | None = None             # why the running requests were cut (None: not cut)
        self.stopping = False
        self._last: float | None = None
        self._running: dict[str, int] = {}         # request_id → frames EnCodec decodes when it finishes

    # ---------------------------------------------------------------------------------------------- measuring
    def observe(self) -> None:
        """After every engine step (before a signal too): the step's wall time, and what retiring requests added."""
        now = time.perf_counter()
        running = {r.request_id: r.total_frames for r in self.engine.scheduler.running.values()}
        if self._last is not None:
            took = now - self._last
            retired = sum(frames for rid, frames in self._running.items() if rid not in running)
            if not retired:
                self._steps.append(took)
            elif self.step_s is not None:
                per_frame = max(0.0, took - self.step_s) / retired
                self.finish_s_per_frame = per_frame if self.finish_s_per_frame is None else \
                    (1 - EMA) * self.finish_s_per_frame + EMA * per_frame
        self._last, self._running = now, running

    @property
    def step_s(self) -> float | None:
        """The recent wall time of one engine step (None before two steps)."""
        return statistics.median(self._steps) if self._steps else None

    def needed_s(self) -> float | None:
        """Seconds until the running request closest to its end is finished (None: nothing to go on yet)."""
        running = list(self.engine.scheduler.running.values())
        if not running or self.step_s is None:
            return None
        per_call = self.engine.config.steps_per_call
        steps = {r.request_id: math.ceil(max(0, r.steps_total - r.steps_done) / per_call) for r in running}
        soonest = min(steps.values())
        frames = sum(r.total_frames for r in running if steps[r.request_id] == soonest)
        return soonest * self.step_s + (self.finish_s_per_frame or 0.0) * frames

    def longest_s(self) -> float | None:
        """Seconds until every running request is finished, by the same estimate."""
        running = list(self.engine.scheduler.running.values())
        if not running or self.step_s is None:
            return None
        per_call = self.engine.config.steps_per_call
        steps = max(math.ceil(max(0, r.steps_total - r.steps_done) / per_call) for r in running)
        frames = sum(r.total_frames for r in running)
        return steps * self.step_s + (self.finish_s_per_frame or 0.0) * frames

    # ---------------------------------------------------------------------------------------------- deciding
    def left_s(self) -> float:
        return self.stop.requested_at + self.grace_s - time.monotonic()

    def announce(self) -> str:
        """What happens now, said once when the first signal is seen."""
        self.stopping = True
        name = signal_name(self.stop.signum)
        running = len(self.engine.scheduler.running)
        if not running:
            return f"{name}: admitting nothing more; finishing what is being written"
        needed = self.longest_s()
        estimate = f" (about {needed:.1f} s at {self.step_s * 1000:.0f} ms per step)" if needed is not None else ""
        return (f"{name}: admitting nothing more; {running} running output(s) have --grace {self.grace_s:g} s from "
                f"the signal to finish and be written{estimate}; send {name} again to stop at once")

    def cut_reason(self) -> str | None:
        """Why the running requests are to be cut now, or None while they go on."""
        if self.reason is not None:
            return self.reason
        grace = f"--grace {self.grace_s:g} s"
        if self.stop.count > 1:
            self.reason = f"were cut short by a second {signal_name(self.stop.signum)}"
        else:
            left = self.left_s()
            needed = self.needed_s()
            if left <= 0:
                self.reason = f"did not finish within {grace}"
            elif needed is not None and needed > left:
                self.reason = (f"would not finish within {grace} (about {needed:.1f} s more needed, "
                               f"{max(0.0, left):.1f} s left)")
        return self.reason
