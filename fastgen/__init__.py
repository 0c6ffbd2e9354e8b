"""fastgen: a custom-kernel inference engine for MusicGen."""
import os

# Before torch loads OpenMP, which reads these once: a thread waiting for work spins briefly (GOMP_SPINCOUNT=1000
# pauses, ~20 us: GNU OpenMP's, torch's on Linux), then sleeps (OMP_WAIT_POLICY=PASSIVE, for any OpenMP). Spinning
# bridges the gaps between the ~260 parallel regions of a decode step; sleeping soon after leaves the cores to other
# processes. musicgen-small, 2 s of audio on a 2-core EPYC (bench/results/contention-*.json): sleeping at once took
# 5.5 s idle and 6.1 s beside busy loops; OpenMP's default (a ~100x longer spin) collapsed beside busy processes
# (10-100x slower); always spinning 3.4 s idle but 27 s beside busy loops; this 3.6-4.1 s idle, 6.7-7.8 s busy. Set
# OMP_WAIT_POLICY (or GOMP_SPINCOUNT) yourself to choose otherwise; when torch was imported before fastgen, its OpenMP
# has read the variables already.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from fastgen.api import MusicGen  # noqa: E402
from fastgen.config import EngineConfig  # noqa: E402
from fastgen.engine.async_engine import AsyncEngine, RequestEvent, RequestHandle  # noqa: E402
from fastgen.engine.engine import Engine  # noqa: E402
from fastgen.engine.request import GenerationOutput  # noqa: E402
from fastgen.engine.streaming import StreamConfig  # noqa: E402
from fastgen.errors import (CheckpointError, EngineClosed, FastgenError, QueueFull, RequestAborted, RequestError,
                            RequestFailed)  # noqa: E402
from fastgen.sampling_params import SamplingParams  # noqa: E402

__all__ = ["MusicGen", "Engine", "AsyncEngine", "RequestHandle", "RequestEvent", "EngineConfig", "SamplingParams",
           "GenerationOutput", "FastgenError", "CheckpointError", "RequestError", "QueueFull", "EngineClosed",
           "RequestFailed", "RequestAborted", "StreamConfig"]
__version__ = "0.1.0"
