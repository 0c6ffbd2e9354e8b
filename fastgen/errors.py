"""Exceptions a user of fastgen can catch.

Every error fastgen raises on purpose is a FastgenError, and also derives from the built-in type that code written
for transformers or the standard library already catches: bad input is a ValueError, a bad checkpoint an OSError and
a ValueError (transformers raises OSError for files it cannot use and ValueError for bad config values), a request
that failed or was aborted while running a RuntimeError."""


class FastgenError(Exception):
    """Base class of fastgen's own errors."""


class CheckpointError(FastgenError, OSError, ValueError):
    """A checkpoint folder is missing files, has malformed files, or does not match the architecture. An OSError (so
    ``except OSError`` around ``from_pretrained``, as written for transformers, catches it) and a ValueError (a
    malformed config value or weight is a content problem)."""

    def __str__(self) -> str:  # OSError would render two arguments as "[Errno a] b"
        return str(self.args[0]) if len(self.args) == 1 else Exception.__str__(self)


class RequestError(FastgenError, ValueError):
    """A request cannot be served as given (bad prompt, bad parameters, too long); raised by submit / add_request /
    generate in the caller, before any work, naming the parameter and what is allowed."""


class QueueFull(RequestError):
    """The engine's waiting queue holds ``max_waiting`` requests already; retry later (an HTTP server answers 503)."""


class EngineClosed(FastgenError, RuntimeError):
    """The engine is shut down (or its loop thread died): it accepts no new requests."""


class RequestFailed(FastgenError, RuntimeError):
    """A request failed while running (for example non-finite logits or audio); other requests are unaffected."""


class RequestAborted(FastgenError, RuntimeError):
    """The request was aborted (by the caller, or by shutdown) before it finished."""
