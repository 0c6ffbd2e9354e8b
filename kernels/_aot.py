"""Ahead-of-time compilation of Triton kernels for a GPU that is not here (sm_80, sm_90), and their resource usage.

`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32), options=...)` needs
no GPU; `cuobjdump --dump-resource-usage` (shipped with Triton) reads registers, stack, shared and local memory
from the cubin. STACK > 0 or LOCAL > 0 means the kernel spills. Works with Triton 3.6 and 3.9; where the API or the
tools are missing, `aot_unavailable()` says why so callers can skip.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from ._configs import KernelConfig

DIVISIBILITY = 16


@dataclass(frozen=True, slots=True)
class Resources:
    label: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    stack: int
    shared: int          # static shared memory in the cubin
    local: int
    dynamic_shared: int  # shared memory Triton requests at launch (metadata.shared)

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def _tool(name: str) -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.isfile(path) else None


@functools.lru_cache(maxsize=None)
def aot_unavailable() -> str | None:
    """None when ahead-of-time compilation works here, else the reason."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the Triton version
        return f"triton has no ASTSource/GPUTarget API: {error}"
    for tool in ("ptxas", "cuobjdump"):
        if _tool(tool) is None:
            return f"triton/backends/nvidia/bin/{tool} is missing"
    return None


def _attrs(config: KernelConfig) -> dict:
    names = [n for n, _ in config.signature]
    types = dict(config.signature)
    return {(names.index(n),): [["tt.divisibility", DIVISIBILITY]] for n in config.aligned if types[n] != "constexpr"}


def _parse_resource_usage(text: str) -> dict[str, int]:
    found = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", text)
        if match is None:
            raise RuntimeError(f"cuobjdump printed no {key}: {text!r}")
        found[key] = int(match.group(1))
    return found


@functools.lru_cache(maxsize=None)
def compile_config(config: KernelConfig, arch: int) -> Resources:
    """Compile `config` for sm_<arch> and read its resource usage (cached for the session)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    reason = aot_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    source = ASTSource(config.kernel, dict(config.signature), dict(config.constexprs), _attrs(config))
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, **dict(config.options)}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin.name], capture_output=True,
                                text=True, check=True).stdout
    usage = _parse_resource_usage(report)
    return Resources(config.label, arch, config.num_warps, config.num_stages, usage["REG"], usage["STACK"],
                     usage["SHARED"], usage["LOCAL"], int(compiled.metadata.shared))


def format_report(rows: list[Resources]) -> str:
    header = f"{'kernel config':<58} {'sm':>3} {'warps':>5} {'stg':>3} {'REG':>4} {'STACK':>5} {'SHARED':>6} " \
             f"{'LOCAL':>5} {'DYNSMEM':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        flag = "  SPILL" if r.spills else ""
        lines.append(f"{r.label:<58} {r.arch:>3} {r.num_warps:>5} {r.num_stages:>3} {r.registers:>4} {r.stack:>5} "
                     f"{r.shared:>6} {r.local:>5} {r.dynamic_shared:>7}{flag}")
    return "\n".join(lines)


def engine_configs() -> list[KernelConfig]:
    """Every configuration the fastgen kernel launchers can pick (each module's ENGINE_CONFIGS)."""
    from . import codebook_embedding, decode_attention, fused_linear, int8_linear, sampling

    return [*codebook_embedding.ENGINE_CONFIGS, *decode_attention.ENGINE_CONFIGS, *sampling.ENGINE_CONFIGS,
            *int8_linear.ENGINE_CONFIGS, *fused_linear.ENGINE_CONFIGS]


def _compile_job(job: tuple[int, int]) -> Resources:
    index, arch = job
    return compile_config(engine_configs()[index], arch)


def main(argv: list[str] | None = None) -> int:
    """`python -m fastgen.kernels._aot [--arch 80 90] [--json PATH]`: compile every engine config, print resources.

    Run without TRITON_INTERPRET (interpreted kernels cannot be compiled); exits 1 if any kernel spills."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    reason = aot_unavailable()
    if reason is not None:
        print(f"ahead-of-time compilation unavailable: {reason}")
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
        return 2
    jobs = [(index, arch) for index in range(len(engine_configs())) for arch in args.arch]
    # one process per core: each compile is single-threaded (Triton's passes, then ptxas); forked, so the workers
    # share the imported kernels and are handed indices, not the unpicklable kernel objects
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=min(len(jobs), cores),
                             mp_context=multiprocessing.get_context("fork")) as pool:
        rows = list(pool.map(_compile_job, jobs))
    print(format_report(rows))
    if args.json:
        fields = ("label", "arch", "num_warps", "num_stages", "registers", "stack", "shared", "local",
                  "dynamic_shared")
        with open(args.json, "w") as f:
            json.dump([{k: getattr(r, k) for k in fields} for r in rows], f, indent=1)
    return 1 if any(r.spills for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
