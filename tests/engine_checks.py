"""Shared by the engine-level tests: running requests that join a running engine at given steps."""
from __future__ import annotations

import numpy as np


def run_schedule(engine, schedule: dict[int, list[tuple]]) -> dict[str, np.ndarray]:
    """``schedule``: engine step → [(request id, prompt, params)] added before that step; runs until every request
    is done (each must succeed) and returns the codes by request id. Empties ``schedule``."""
    codes, step = {}, 0
    while schedule or engine.has_unfinished():
        for request_id, prompt, params in schedule.pop(step, []):
            engine.add_request(prompt, params, request_id=request_id)
        for request in engine.step():
            assert request.error is None, request.error
            codes[request.request_id] = request.output.codes
        step += 1
    return codes
