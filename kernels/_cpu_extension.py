"""fastgen's C++ CPU kernels (``cpu_*.cpp`` beside this file) as one extension, registered as the operators
``fastgen_cpu::*``: built on first use with torch's extension builder (ninja and a C++ compiler; about
``TYPICAL_BUILD_S`` seconds once, announced on stderr) into a folder of its own under ``TORCH_EXTENSIONS_DIR`` (or
torch's default extensions root), ``fastgen_cpu-<key>``, keyed by the sources and the torch build: an edited source
builds anew, and two installs (venvs, checkouts) never rebuild each other's. Processes loading at once wait for one
build. Loaded once per process. The kernels are compiled for AVX-512 and for AVX2 through function attributes and
pick one at run time, so the build works on any x86-64 host; callers check the CPU's instructions
(``instruction_set_missing``) before calling them. Where the build fails, ``build()`` says why and the callers keep
their other paths."""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from pathlib import Path

import torch

NAME = "fastgen_cpu"  # the library's name; the operators' namespace is the .cpp files' TORCH_LIBRARY one
SOURCES = sorted(str(path) for path in Path(__file__).parent.glob("cpu_*.cpp"))
# -O3, not -O2: -O2 compiles the GEMV ~30% faster but leaves its per-row accumulator arrays in memory (the loops over
# rows are unrolled only at -O3). -fopenmp (a third of the GEMV's compile time): without it at::parallel_for runs on
# one thread.
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
# a cold build on a 2-core AMD EPYC (AVX2), where ninja compiles the two sources at once: 25-50 s measured while other
# jobs kept both cores busy (the compiler's CPU time: 14 s for cpu_gemv.cpp, 10-11 s for cpu_attention.cpp)
TYPICAL_BUILD_S = 40  # four sources on 2 cores: 19 s on an AVX-512 EPYC (quiet), ~40-80 s on an AVX2 one


def instruction_set_missing(dtype: torch.dtype) -> str | None:
    """Why this CPU cannot run the kernels on ``dtype`` data, or None: they need AVX2 and FMA at least (torch's AVX2
    level includes FMA), and use AVX-512 (bf16 dot products: AVX512-BF16) where the CPU has it."""
    if dtype not in (torch.bfloat16, torch.float32, torch.int8):
        return f"the kernels take bfloat16, float32 or int8 (GEMV weights), not {dtype}"
    if not torch.cpu._is_avx2_supported():
        return "the CPU has no AVX2"
    return None


def build_folder() -> Path:
    """This build's folder: ``fastgen_cpu-<key>`` under TORCH_EXTENSIONS_DIR or torch's default root, the key hashing
    what ends up in its build.ninja or the objects (the sources' paths and contents, the flags, the compiler, torch's
    version, CXX11 ABI and headers' location, Python's version and headers). ninja rebuilds whenever build.ninja
    changes, so two installs sharing one folder would rebuild at every load of the other."""
    import sysconfig

    from torch.utils import cpp_extension
    key = hashlib.sha256()
    for part in (torch.__version__, torch._C._GLIBCXX_USE_CXX11_ABI, cpp_extension.include_paths(), sys.version,
                 sysconfig.get_paths()["include"], os.environ.get("CXX", "c++"), CFLAGS, LDFLAGS):
        key.update(repr(part).encode() + b"\0")
    for source in SOURCES:
        key.update(source.encode() + b"\0" + Path(source).read_bytes() + b"\0")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / f"{NAME}-{key.hexdigest()[:16]}"


@functools.cache
def build() -> str | None:
    """Build (or find built) and load the extension once per process; why it failed, or None."""
    try:
        _build_and_load(build_folder())
    except Exception as exc:  # no compiler, no ninja, a read-only cache folder ...
        return f"building fastgen's CPU kernels failed ({type(exc).__name__}: {str(exc).strip()[:200]})"
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{NAME}::{name}", fake)
    return None


def _build_and_load(folder: Path) -> None:
    """torch's load, one process at a time per folder, saying so on stderr when it compiles. torch's own lock (a
    ``lock`` file it creates and removes) already makes a second process wait and then load the first one's build,
    but a process killed mid-build leaves that file behind and every later load waits for it forever; an flock here
    dies with its process, and under it a ``lock`` file is such a leftover."""
    import fcntl

    from torch.utils.cpp_extension import load
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "fastgen.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not (folder / f"{NAME}.so").exists():
                print(f"waiting for another process's build of fastgen's CPU kernels ({folder})…", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)
        cached = (folder / f"{NAME}.so").exists()
        if not cached:
            print(f"building fastgen's CPU kernels (once, about {TYPICAL_BUILD_S} s)…", file=sys.stderr)
        start = time.perf_counter()
        load(name=NAME, sources=SOURCES, extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, build_directory=str(folder),
             is_python_module=False, verbose=os.environ.get("FASTGEN_VERBOSE_BUILD") == "1")
        if not cached:
            print(f"built fastgen's CPU kernels in {time.perf_counter() - start:.1f} s ({folder})", file=sys.stderr)


def _gemv_linear_shape(x, packed, out_features, residual=None, scale=None):
    return x.new_empty(x.shape[0], out_features)


def _decode_attention_shape(q, k_cache, v_cache, cache_rows, span, bias, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _decoder_layers_shape(hidden, *rest):
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


def _sample_next_tokens_shape(*args):
    return None  # writes its outputs in place


_FAKES = {"gemv_linear": _gemv_linear_shape, "decode_attention": _decode_attention_shape,
          "decoder_layers": _decoder_layers_shape, "sample_next_tokens": _sample_next_tokens_shape}
