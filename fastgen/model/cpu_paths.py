"""Which kernel computes each decoder projection: a rule, never a measurement.

A projection's bits depend on its kernel (each sums in its own order), and one different bit in a logit can change
a sampled token and everything after it. So the path is a pure function of the CPU's instructions, whether
fastgen's C++ kernels built, the weight's shape and dtype, and the settings (quantization): the first path of the
preference order that runs the weight here. A timing race at load picked among them before, and the same seed gave
different music in different processes.

The order puts fastgen's GEMV first: it streams the weights at or near the read bandwidth at decode rows on every
CPU measured so far (2-core AMD EPYCs with AVX-512 and with AVX2 only; bench/cpu_step.py compares the paths, pinned
one at a time), and it computes each row in the same order whatever the rows beside it and the thread count (it
splits output channels across threads, never K): the CPU's batch and thread invariance rest on it. It serves every
row count; past ~8 rows oneDNN's GEMM would be as fast, but switching kernels by batch size would make a row's bits
depend on its batch-mates. Where the GEMV cannot run (no AVX2, no compiler, a shape it does not pack), oneDNN's
packed inner product, then aten."""
from __future__ import annotations

from collections.abc import Callable

import torch

from fastgen.model.linear import (QUANTIZED_PATHS, DenseLinear, DynamicInt8Linear, GemvLinear, Int4Linear,
                                  Int8Linear, Linear, PackedLinear)

CPU_PATHS = ("gemv", "onednn-packed", "aten")  # float weights, in order of preference; aten runs everywhere
INT8_CPU_PATHS = ("int8-gemv", "int8")  # weight-only int8: fastgen's GEMV, then aten's _weight_int8pack_mm
_CHOSEN: dict[tuple, str] = {}  # (dtype or "int8", (N, K)) → path, worked out once per process


def make_linear(weight: torch.Tensor, path: str) -> Linear:
    if path == "aten":
        return DenseLinear(weight)
    if path == "onednn-packed":
        return PackedLinear(weight)
    if path == "gemv":
        return GemvLinear(weight)
    if path == "int8":
        return Int8Linear.from_float(weight)
    if path == "int8-gemv":
        return Int8Linear.from_float(weight, cpu_kernel="gemv")
    raise ValueError(f"unknown linear path {path!r}")


def _runs_here(weight: torch.Tensor, path: str) -> bool:
    """Whether ``path`` takes this weight on this CPU: it builds (the GEMV refuses shapes and CPUs it cannot run,
    oneDNN's bf16 reorder CPUs without AVX-512) and computes two rows."""
    try:
        with torch.inference_mode():
            make_linear(weight, path)(torch.zeros(2, weight.shape[1], dtype=weight.dtype))
        return True
    except RuntimeError:
        return False


def choose_cpu_path(weight: torch.Tensor, quantization: str | None = None) -> str:
    """The first of CPU_PATHS (INT8_CPU_PATHS for ``quantization="int8"``, from the float weight) that runs this
    weight's shape and dtype here; the same for every weight of that shape and dtype in the process."""
    candidates = INT8_CPU_PATHS if quantization == "int8" else CPU_PATHS
    key = (quantization or weight.dtype, tuple(weight.shape))
    if key not in _CHOSEN:
        _CHOSEN[key] = next((path for path in candidates[:-1] if _runs_here(weight, path)), candidates[-1])
    return _CHOSEN[key]


def build_linears(loaders: list[Callable[[], torch.Tensor]], *, device: torch.device, dtype: torch.dtype,
                  quantization: str | None) -> list[Linear]:
    """One role's weights (every layer's fc1, say: one shape), each read by its loader (float, as in the checkpoint)
    → Linears, each converted as it is read, so memory never holds a role twice. The quantisations quantise each
    from the checkpoint's float values; a CPU takes choose_cpu_path's path for the float and int8 weights; other
    devices the stock path (int8: the Triton GEMV)."""
    def cast(load: Callable[[], torch.Tensor]) -> torch.Tensor:
        weight = load()  # a meta tensor stands for a missing weight: the checkpoint reader reports those at the end
        return weight if weight.is_meta else weight.to(device=device, dtype=dtype)

    if quantization == "int8" and device.type == "cpu":
        return _cpu_linears(loaders, lambda load: load(), quantization)
    if quantization in QUANTIZED_PATHS:
        kind = {"int8": Int8Linear, "int8-dynamic": DynamicInt8Linear, "int4": Int4Linear}[quantization]
        return [kind.from_float(w) if not w.is_meta else DenseLinear(w) for w in (load() for load in loaders)]
    if device.type != "cpu":
        return [DenseLinear(cast(load)) for load in loaders]
    return _cpu_linears(loaders, cast, None)


def _cpu_linears(loaders: list[Callable[[], torch.Tensor]], read: Callable, quantization: str | None) -> list[Linear]:
    linears: list[Linear] = []
    for load in loaders:
        weight = read(load)
        # a missing weight stays a meta placeholder: the loader reports it after reading the rest
        linears.append(DenseLinear(weight) if weight.is_meta
                       else make_linear(weight, choose_cpu_path(weight, quantization)))
    return linears


def chosen_paths() -> dict[tuple, str]:
    """The paths chosen in this process, by (dtype or "int8", shape) (for benchmarks and logs)."""
    return dict(_CHOSEN)
