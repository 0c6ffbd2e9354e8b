"""Exceptions a user of fastgen can catch."""


class FastgenError(Exception):
    """Base class of fastgen's own errors."""


class CheckpointError(FastgenError):
    """A checkpoint folder is missing files, has malformed files, or does not match the architecture."""


class RequestError(FastgenError, ValueError):
    """A request cannot be served as given (bad prompt, bad parameters, too long)."""


class RequestFailed(FastgenError):
    """A request failed while running (for example non-finite logits); other requests are unaffected."""


class RequestAborted(FastgenError):
    """The request was aborted by the caller before it finished."""


class QueueFull(RequestError):
    """The engine's waiting queue is full (EngineConfig.max_waiting): retry later."""
