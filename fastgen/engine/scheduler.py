"""Admission and retirement over a fixed pool of KV-cache slots. Plain Python: no torch, unit-testable anywhere.

Every request's maximum length is known when it arrives and a slot holds the longest allowed request, so a
request admitted is never preempted: admission only needs a free slot."""
from __future__ import annotations

from collections import deque

from fastgen.engine.request import Request, RequestStatus


class Scheduler:
    def __init__(self, num_slots: int, max_admit_per_step: int | None = None) -> None:
        self.num_slots = num_slots
        self.max_admit_per_step = max_admit_per_step or num_slots
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot → request
        self.free_slots: list[int] = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first
        self.version = 0  # bumped whenever the running set changes

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def has_ready(self) -> bool:
        return any(not r.text_pending for r in self.waiting)

    def admit(self) -> list[Request]:
        """Move waiting requests into free slots, first come first served among those whose text encoding is done
        (a request whose T5 still runs ahead on the stage worker lets later ones pass)."""
        admitted = []
        for request in list(self.waiting):
            if not self.free_slots or len(admitted) >= self.max_admit_per_step:
                break
            if request.text_pending:
                continue
            self.waiting.remove(request)
            request.slot = self.free_slots.pop()
            request.status = RequestStatus.RUNNING
            self.running[request.slot] = request
            admitted.append(request)
            self.version += 1
        return admitted

    def running_slots(self) -> list[int]:
        return sorted(self.running)

    def advance(self, steps: int = 1) -> tuple[list[Request], list[Request]]:
        """Account ``steps`` decode steps for every running request; return (those whose last step was among them,
        those whose current window ended among them: long-form requests due for the next window). A request whose
        window ends inside a multi-step call ran on to the call's end on pad tokens; nothing of that counts."""
        done, window_ends = [], []
        for request in self.running.values():
            window_end = request.window.last_step
            request.steps_done = min(request.steps_done + steps, window_end)
            if request.steps_done >= request.steps_total:
                done.append(request)
            elif request.steps_done >= window_end:
                window_ends.append(request)
        return done, window_ends

    def release(self, request: Request, status: RequestStatus) -> None:
        """Free the request's slot (if it has one) at once; it is reused by the next admission."""
        if request.slot is not None and self.running.get(request.slot) is request:
            del self.running[request.slot]
            self.free_slots.append(request.slot)
            self.version += 1
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status

    def find(self, request_id: str) -> Request | None:
        for request in self.waiting:
            if request.request_id == request_id:
                return request
        for request in self.running.values():
            if request.request_id == request_id:
                return request
        return None
