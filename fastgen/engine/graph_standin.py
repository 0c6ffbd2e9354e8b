"""A CPU stand-in for CUDA graphs, so that DecodeGraphs (buckets, set_batch, padding, replay, steps_per_call) runs
where there is no GPU: in CI and in the GPU report's dry run. It lives in the package, not in tests/, for that
second user; nothing else imports it.

Capture records, through a TorchDispatchMode, every operator the captured code dispatches (aten ops and the Triton
kernels, which are torch custom ops): the operator, its tensor arguments by identity and its other arguments as
values. Replay runs exactly that list again on the same tensors and writes each result into the tensor capture
produced, which the recording keeps alive as a graph's private pool does. No Python of the step runs on replay, so
Python scalars, host-side branches and tensors made on the host are frozen at capture, as on a GPU, and a kernel
launched around the dispatcher would simply be missing; reading a device value on the host during capture raises,
as CUDA's capture does. Capture does not run the kernels (CUDA's capture runs nothing); it does run the aten ops,
which make the tensors the recording refers to (DecodeGraphs captures on its dummy slot, so only that slot's state
moves). Graphs sharing a pool do not share memory here. Streams and synchronize are no-ops (a CPU runs one
stream)."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastgen.engine.launch_count import ALLOCATIONS

# operators whose result a host must read (a sync on CUDA) or whose output shape depends on data
HOST_READS = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "unique", "_unique",
              "_unique2", "unique_consecutive", "unique_dim", "equal", "is_nonzero", "_assert_async", "bincount",
              "repeat_interleave"}


class CapturedGraph:
    """Stands in for torch.cuda.CUDAGraph."""

    def __init__(self) -> None:
        self.recording: list[tuple] = []   # (operator, args, kwargs, captured result)
        self.kept: list[object] = []       # allocations: kept alive, never re-run (their contents are undefined)
        self.inference = False

    def pool(self) -> object:
        return self

    def replay(self) -> None:
        with torch.inference_mode(self.inference):
            for func, args, kwargs, captured in self.recording:
                _write_into(captured, func(*args, **kwargs))


def _write_into(captured, result) -> None:
    """Each fresh tensor replay produced goes into the one capture produced; results that alias their inputs (views,
    in-place ops) are those very tensors already."""
    for old, new in zip(tree_leaves(captured), tree_leaves(result)):
        if isinstance(old, torch.Tensor) and new is not old and new.data_ptr() != old.data_ptr():
            old.copy_(new)


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: CapturedGraph) -> None:
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in HOST_READS:
            raise RuntimeError(f"graph capture: {func} reads device data on the host or has a data-dependent shape "
                               "(CUDA: operation not permitted when stream is capturing)")
        if func.namespace == "fastgen" and not func._schema.returns:
            result = None  # a kernel that only writes its arguments: recorded, not run (CUDA's capture runs nothing)
        else:
            result = func(*args, **kwargs)
        if any(isinstance(leaf, (bool, int, float)) for leaf in tree_leaves(result)):
            raise RuntimeError(f"graph capture: {func} returned a host value computed from device data")
        if func in ALLOCATIONS:  # contents undefined: replay keeps the captured memory, as a graph's pool does
            self.graph.kept.append(result)
        else:  # views too: some ops alias their input only sometimes (aten.to), and re-running a view costs little
            self.graph.recording.append((func, args, kwargs, result))
        return result


@contextlib.contextmanager
def graph(cuda_graph: CapturedGraph, pool=None, stream=None, **options):
    """Stands in for torch.cuda.graph: what runs inside is executed and recorded into ``cuda_graph``."""
    cuda_graph.inference = torch.is_inference_mode_enabled()
    with _Recorder(cuda_graph):
        yield cuda_graph


class Stream:
    def wait_stream(self, other: "Stream") -> None:
        pass


_STREAM = Stream()
CPU_GRAPHS = SimpleNamespace(device_type="cpu", CUDAGraph=CapturedGraph, graph=graph, Stream=Stream,
                             stream=lambda stream: contextlib.nullcontext(), current_stream=lambda: _STREAM,
                             synchronize=lambda: None)


@contextlib.contextmanager
def cpu_graphs():
    """While active, engines on the CPU with the triton backend and enforce_eager=False capture DecodeGraphs through
    this stand-in (each step then replays recorded operators)."""
    from fastgen.engine.graphs import DecodeGraphs

    previous = DecodeGraphs.api
    DecodeGraphs.api = CPU_GRAPHS
    try:
        yield
    finally:
        DecodeGraphs.api = previous
