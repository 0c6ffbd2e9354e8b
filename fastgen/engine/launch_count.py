"""Counting the kernels a decode step launches, on any machine (a CPU included), without a GPU profiler.

The rule (issue 14's), applied to everything the code under ``count_launches()`` dispatches:
- every dispatched aten operator that computes counts 1: GEMMs, LayerNorm, GELU, copies (``_to_copy``, ``copy_``,
  ``clone``), ``cat``, ``index``, ``index_add_``, ``zero_``, ``fill_``, arithmetic ...;
- an out-of-place ``addmm`` counts 2: on CUDA ``addmm_out_cuda_impl`` first copies ``self`` into the fresh result
  (a copy kernel the dispatcher never sees), then runs the GEMM with beta = 1;
- a fastgen kernel op (``torch.ops.fastgen.*``) is one Triton launch and counts 1 (``kernels/_library.py``);
- views, reshapes and aliases (operators whose schema returns an alias, and ``_unsafe_view``), metadata queries
  and allocations (``empty*``: no kernel runs) count 0; an alias-returning operator that had to copy instead
  (``to`` a new dtype, ``reshape`` or ``contiguous`` of a strided tensor) counts 1.
On CUDA, a captured graph replays exactly these launches, so the count of one call of ``ModelRunner.decode_step`` at
graph-bucket shapes is the number of kernels one replay runs per step.

The fastgen kernels are not run (``run_kernels=False``, the default): an op that only writes its arguments is
skipped, one that returns tensors returns its fake implementation's (uninitialised tensors of the right shapes), so
counting needs neither a GPU nor Triton's slow interpreter. What the step computes is then meaningless; the count is
not, as long as the step has no data-dependent control flow, which a CUDA-graph-safe step has not.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# allocations: no kernel runs, the contents are undefined (the CPU graph stand-in keeps these too)
ALLOCATIONS = frozenset({aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
                         aten.new_empty.default, aten.new_empty_strided.default})
# not views by their schema, but no kernel runs: a reshape's fresh alias, metadata queries
NO_KERNEL = frozenset({"_unsafe_view", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
                       "is_contiguous", "size", "stride", "dim", "numel"})
# out-of-place GEMMs with an added input: on CUDA a copy of that input into the result, then the GEMM
COPY_THEN_GEMM = frozenset({aten.addmm.default})


@dataclass
class LaunchCount:
    """Launches by operator name (``aten.mm``, ``fastgen.decode_attention_append`` ...)."""
    by_op: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def of(self, *names: str) -> int:
        """Launches of the named operators."""
        return sum(self.by_op[name] for name in names)

    def excluding(self, *names: str) -> Counter:
        """The counts without the named operators (what is left when those are accounted for)."""
        return Counter({name: n for name, n in self.by_op.items() if name not in names})

    def __sub__(self, other: "LaunchCount") -> "LaunchCount":
        return LaunchCount(Counter({k: v for k, v in (self.by_op - other.by_op).items() if v}))

    def __str__(self) -> str:
        rows = sorted(self.by_op.items(), key=lambda item: (-item[1], item[0]))
        return f"{self.total} launches: " + ", ".join(f"{name} {n}" for name, n in rows)


def launches_of(func, args, kwargs, result) -> int:
    """How many kernels one call of ``func`` (which returned ``result``) launches on CUDA, by the rule above."""
    if func.namespace == "fastgen":
        return 1
    if func in ALLOCATIONS or func.overloadpacket.__name__ in NO_KERNEL:
        return 0
    if func.is_view:  # also ``to``, ``reshape``, ``contiguous``: an alias when they can be, a copy when not
        return int(_copied(args[0], result))
    if func in COPY_THEN_GEMM or (func == aten.linear.default and _bias(args, kwargs) is not None):
        return 2  # (linear with a bias is addmm on CUDA; grad mode decomposes it before dispatch, inference not)
    return 1


def _copied(source, result) -> bool:
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    if not isinstance(source, torch.Tensor):
        return False
    storage = source.untyped_storage().data_ptr()
    return any(isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() != storage for out in outputs)


def _bias(args, kwargs):
    return args[2] if len(args) > 2 else kwargs.get("bias")


class _LaunchCounter(TorchDispatchMode):
    def __init__(self, count: LaunchCount, run_kernels: bool) -> None:
        super().__init__()
        self.count, self.run_kernels = count, run_kernels

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastgen" and not self.run_kernels:
            from fastgen.kernels._library import fake_result
            result = fake_result(func, args, kwargs)
        else:
            result = func(*args, **kwargs)
        launches = launches_of(func, args, kwargs, result)
        if launches:
            self.count.by_op[f"{func.namespace}.{func.overloadpacket.__name__}"] += launches
        return result


@contextlib.contextmanager
def count_launches(run_kernels: bool = False) -> Iterator[LaunchCount]:
    """``with count_launches() as count: step()`` fills ``count`` with the launches ``step`` makes."""
    count = LaunchCount()
    with _LaunchCounter(count, run_kernels):
        yield count


def count_decode_step(runner, bucket: int = 1) -> LaunchCount:
    """Launches of one ``runner.decode_step`` as DecodeGraphs captures it for ``bucket`` rows: every row on the
    dummy slot (so no request's state moves), no host spans, after one uncounted call (launchers grow their scratch
    once, as they do in the warm-up before a capture)."""
    from fastgen.model.ops import SamplerHints

    slot_ids = torch.full((bucket,), runner.dummy_slot, dtype=torch.int64, device=runner.device)
    for _ in range(2):
        with torch.inference_mode(), count_launches() as count:
            runner.decode_step(slot_ids, SamplerHints(), None, None)
    return count


class _OperatorCounter(TorchDispatchMode):
    def __init__(self, count: LaunchCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count.by_op[f"{func.namespace}.{func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_operators() -> Iterator[LaunchCount]:
    """Every operator dispatched under it, views and allocations included, each run as usual: on a CPU each one is
    a dispatch with Python and often an OpenMP fork/join around it, whatever it computes (the eager CPU step's
    fixed cost). Operators a C++ operator calls inside itself are not dispatched from Python and are not counted."""
    count = LaunchCount()
    with _OperatorCounter(count):
        yield count
