"""fastgen: a custom-kernel inference engine for MusicGen."""
import os

# Before torch loads OpenMP, which reads this once: threads waiting at the end of a parallel region sleep instead of
# spinning. Beside other multi-threaded torch processes, spinning threads and a descheduled team-mate made a 2-thread
# decode 10-100x slower (a 4 s tiny-model clip: 2-27 s; 0.3-0.7 s passive); beside single-threaded busy loops
# spinning is faster (0.47 s against 1.09 s, idle 0.73: bench/results/contention-*.json), but passive stays near its
# fair share in both. Set OMP_WAIT_POLICY yourself to choose otherwise; when torch was imported before fastgen, its
# OpenMP has read the variable already.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
