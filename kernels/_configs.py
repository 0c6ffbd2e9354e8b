"""What the ahead-of-time check (``_aot``) compiles: each kernel module lists its engine configurations
(``ENGINE_CONFIGS``) as KernelConfigs. A leaf module, so the kernels and ``_aot`` (which imports them all) do not import
each other."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """One compiled specialisation of a kernel, as the launcher would ask the JIT for it."""

    label: str                           # readable: kernel and shape family
    kernel: object                       # the @triton.jit function
    signature: tuple[tuple[str, str], ...]  # (argument, type): "*fp16", "*i64", "i32", "fp32", "constexpr"
    constexprs: tuple[tuple[str, object], ...]
    aligned: tuple[str, ...]             # pointers and integers the JIT would see as multiples of 16
    num_warps: int
    num_stages: int
    options: tuple[tuple[str, object], ...] = field(default=())  # extra compile options (enable_fp_fusion, ...)


def make_config(label, kernel, types: dict[str, str], constexprs: dict[str, object], aligned, num_warps: int,
                num_stages: int, **options) -> KernelConfig:
    """Build a KernelConfig; `types` names every runtime argument, `constexprs` every tl.constexpr one and any
    integer argument the JIT would specialise to a constexpr (it does so for the value 1)."""
    names = list(kernel.arg_names)
    missing = [n for n in names if n not in types and n not in constexprs]
    unknown = [n for n in list(types) + list(constexprs) if n not in names]
    if missing or unknown:
        raise ValueError(f"{kernel.__name__}: missing arguments {missing}, unknown arguments {unknown}")
    signature = tuple((n, "constexpr" if n in constexprs else types[n]) for n in names)
    return KernelConfig(label, kernel, signature, tuple(constexprs.items()), tuple(aligned), num_warps, num_stages,
                        tuple(sorted(options.items())))
