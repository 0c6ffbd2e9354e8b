"""fastgen: a custom-kernel inference engine for MusicGen."""
from fastgen.api import MusicGen
from fastgen.config import EngineConfig
from fastgen.engine.async_engine import AsyncEngine, RequestEvent, RequestHandle
from fastgen.engine.engine import Engine
from fastgen.engine.request import GenerationOutput
from fastgen.engine.streaming import StreamConfig
from fastgen.errors import (CheckpointError, EngineClosed, FastgenError, QueueFull, RequestAborted, RequestError,
                            RequestFailed)
from fastgen.sampling_params import SamplingParams

__all__ = ["MusicGen", "Engine", "AsyncEngine", "RequestHandle", "RequestEvent", "EngineConfig", "SamplingParams",
           "GenerationOutput", "FastgenError", "CheckpointError", "RequestError", "QueueFull", "EngineClosed",
           "RequestFailed", "RequestAborted", "StreamConfig"]
__version__ = "0.1.0"
