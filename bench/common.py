"""Shared pieces of the benchmarks: checkpoints with random weights, the copy-bandwidth yardstick, timing."""
from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

from fastgen.config import QUANTIZATIONS

CACHE = Path(os.environ.get("FASTGEN_BENCH_CACHE", Path.home() / ".cache" / "fastgen" / "bench"))
PROMPTS = ["80s pop track with bassy drums and synth", "lofi hip hop beat for studying", "epic orchestral score",
           "90s rock song with loud guitars and heavy drums", "calm piano melody", "funky bass groove with horns",
           "ambient drone with slow pads", "fast drum and bass with a rolling bassline"]


def checkpoint(name: str, dtype: str) -> Path:
    from fastgen.tiny import build_checkpoint, build_tiny_checkpoint
    if Path(name).is_dir():
        return Path(name)
    folder = CACHE / (f"{name}-{dtype}" if name != "tiny" else "tiny")
    if not (folder / "config.json").is_file():
        print(f"building {name} checkpoint (random weights) in {folder} …", file=sys.stderr)
        if name == "tiny":
            build_tiny_checkpoint(folder, overwrite=True)
        else:
            import torch
            build_checkpoint(folder, size=name, dtype=getattr(torch, dtype))
    return folder


_COPY_BUFFERS: dict[str, tuple] = {}


def copy_bandwidth(device: str, repeats: int = 5) -> float:
    """Bytes per second of a large device copy (read + write), measured now (best of ``repeats``), as the
    memory-bound floor's yardstick. The 2 × 256 MiB buffers are made and touched once per process, so repeated
    calls (one per benchmark round) time the copy alone."""
    import torch
    if device not in _COPY_BUFFERS:
        src = torch.randn((256 << 20) // 4, device=device)
        _COPY_BUFFERS[device] = (src, torch.zeros_like(src))
    src, dst = _COPY_BUFFERS[device]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def peak_memory(device) -> int:
    """Peak bytes: CUDA allocator peak on a GPU, the process's peak resident set on a CPU."""
    import torch
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine_name(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    import platform

    import torch
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)"


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower()[:40] or "machine"




def write_result(kind: str, device: str, machine: str, out: Path | None, fields: dict) -> Path:
    """Write a benchmark's JSON (with date, machine and versions) to ``out`` or bench/results/<kind>-<device>-<machine>."""
    import json
    from datetime import datetime, timezone

    import torch
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "torch": torch.__version__, **fields}
    out = out or Path(__file__).parent / "results" / f"{kind}-{device.split(':')[0]}-{slug(machine)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return out


# fastgen variants a benchmark can run beside the default engine, by system name
def fastgen_systems(compile_step: bool, steps_per_call: int, quantize: str | None = None) -> list[str]:
    """fastgen, then each asked-for variant: compiled, multi-step, each quantisation (and, with compile_step, each
    quantisation compiled too)."""
    compiled = ["-compiled"] if compile_step else []
    return (["fastgen"] + [f"fastgen{c}" for c in compiled]
            + ([f"fastgen-steps{steps_per_call}"] if steps_per_call > 1 else [])
            + [f"fastgen-{mode}{c}" for mode in quantize_modes(quantize) for c in ["", *compiled]])


def quantize_modes(quantize: str | None) -> list[str]:
    """--quantize's comma list ("int8,int8-dynamic,int4") as a list; checked against the modes fastgen knows."""
    modes = [mode for mode in (quantize or "").split(",") if mode]
    unknown = [mode for mode in modes if mode not in QUANTIZATIONS]
    if unknown:
        raise SystemExit(f"--quantize: unknown mode(s) {unknown}; known: {[q for q in QUANTIZATIONS if q]}")
    return modes


def fastgen_options(system: str) -> dict:
    """EngineConfig options of a system named by fastgen_systems."""
    options = {}
    if system.endswith("-compiled"):
        options["compile_step"] = True
        system = system.removesuffix("-compiled")
    if system.startswith("fastgen-steps"):
        options["steps_per_call"] = int(system.removeprefix("fastgen-steps"))
    elif system.removeprefix("fastgen-") in QUANTIZATIONS:
        options["quantization"] = system.removeprefix("fastgen-")
    return options


def add_variant_arguments(parser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="also run fastgen with compile_step=True (torch backend: CPU, or CUDA without graphs)")
    parser.add_argument("--steps-per-call", type=int, default=1,
                        help="also run fastgen with this many decode steps per call (one CUDA-graph replay)")
    parser.add_argument("--quantize", default=None,
                        help="comma list: also run fastgen with quantised decoder projections (quantization='int8': "
                             "weight-only; 'int8-dynamic': CPU, activations quantised per call too; 'int4': CPU, "
                             "weight-only)")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a reader (or a timeout) never sees half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def append_json_line(path: Path | None, row: dict) -> None:
    """One JSON line per finished system, flushed at once (a later timeout keeps the rows before it)."""
    if path is None:
        return
    import json
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
