"""The Triton launches as torch operators (namespace ``fastgen``), so the dispatcher sees each launch as one op: a
TorchDispatchMode (the CPU CUDA-graph stand-in, graph-safety checks), torch.compile (through the fake
implementation) and the profiler (``fastgen::decode_attention`` ...).

``torch.library.define`` + ``impl`` rather than ``torch.library.custom_op``: the decorator's Python wrapper costs
~50 µs a call on a CPU against ~8 µs here (measured with empty bodies), and a decode step makes two calls per layer.
In-place outputs are declared mutable in the schema (``Tensor(a!)``); the ops return nothing, the launchers return
their outputs. CPU is registered too: the kernels run there under TRITON_INTERPRET=1.

Each op is one Triton launch, and records its fake implementation for fastgen.engine.launch_count, which counts a
step's kernels without running them."""
from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "fastgen"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")  # kept alive: registrations die with the object
_FAKES: dict[torch._ops.OpOverload, Callable] = {}


def _no_output(*args, **kwargs) -> None:
    """Fake implementation of an op that only writes its mutable arguments."""


def define_kernel_op(schema: str, kernel: Callable, fake: Callable = _no_output) -> torch._ops.OpOverload:
    """Register ``fastgen::<schema>`` with ``kernel`` (one Triton launch) for CUDA and CPU and ``fake`` for tracing;
    returns the op."""
    name = schema.split("(", 1)[0]
    _LIBRARY.define(schema)
    for key in ("CUDA", "CPU"):
        _LIBRARY.impl(name, kernel, key)
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIBRARY)
    op = getattr(getattr(torch.ops, NAMESPACE), name).default
    _FAKES[op] = fake
    return op


def fake_result(op: torch._ops.OpOverload, args: tuple, kwargs: dict):
    """What ``op`` returns, without running its kernel: nothing for an op that only writes its arguments, its fake
    implementation's uninitialised tensors otherwise (an op defined elsewhere runs for real)."""
    if not op._schema.returns:
        return None
    fake = _FAKES.get(op)
    return op(*args, **kwargs) if fake is None else fake(*args, **kwargs)
