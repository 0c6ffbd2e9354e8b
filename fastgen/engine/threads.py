"""The intra-op thread count an engine's decode runs with on a CPU: ``cpu_threads`` of MusicGen.from_pretrained,
Engine and AsyncEngine, $FASTGEN_CPU_THREADS, ``--threads`` of ``fastgen generate`` and ``fastgen serve``."""
from __future__ import annotations

import contextlib
import numbers
import os
from typing import Iterator

import torch

CPU_THREADS_ENV = "FASTGEN_CPU_THREADS"  # cpu_threads when a caller gives none


def resolve_cpu_threads(cpu_threads: int | None, default: int | None = None) -> int | None:
    """The intra-op thread count an engine's decode runs with: ``cpu_threads`` if given, else $FASTGEN_CPU_THREADS if
    set, else ``default`` (None: the calling thread's own count). ValueError naming the parameter for anything but a
    positive integer."""
    what = "cpu_threads"
    if cpu_threads is None:
        raw = os.environ.get(CPU_THREADS_ENV, "").strip()
        if not raw:
            return default
        what, cpu_threads = CPU_THREADS_ENV, raw
        try:
            cpu_threads = int(raw)
        except ValueError:
            pass
    if isinstance(cpu_threads, bool) or not isinstance(cpu_threads, numbers.Integral) or cpu_threads < 1:
        raise ValueError(f"{what} must be a positive integer (the intra-op thread count of the engine's decode), "
                         f"got {cpu_threads!r}")
    return int(cpu_threads)


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count of this thread set to ``count`` (None: unchanged) for the block."""
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
