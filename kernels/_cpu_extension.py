"""fastgen's C++ CPU kernels (``cpu_*.cpp`` beside this file) as one extension, registered as the operators
``fastgen_cpu::*``: built on first use with torch's extension builder (ninja and a C++ compiler; ~30 s, cached under
``TORCH_EXTENSIONS_DIR``, rebuilt when a source changes) and loaded once per process. The kernels are compiled for
AVX-512 and for AVX2 through function attributes and pick one at run time, so the build works on any x86-64 host;
callers check the CPU's instructions
(``instruction_set_missing``) before calling them. Where the build fails, ``build()`` says why and the callers keep
their other paths."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

SOURCES = sorted(str(path) for path in Path(__file__).parent.glob("cpu_*.cpp"))


def instruction_set_missing(dtype: torch.dtype) -> str | None:
    """Why this CPU cannot run the kernels on ``dtype`` data, or None: they need AVX2 and FMA at least (torch's AVX2
    level includes FMA), and use AVX-512 (bf16 dot products: AVX512-BF16) where the CPU has it."""
    if dtype not in (torch.bfloat16, torch.float32, torch.int8):
        return f"the kernels take bfloat16, float32 or int8 (GEMV weights), not {dtype}"
    if not torch.cpu._is_avx2_supported():
        return "the CPU has no AVX2"
    return None


@functools.cache
def build() -> str | None:
    """Build (or find built) and load the extension once per process; why it failed, or None."""
    try:
        from torch.utils.cpp_extension import load
        load(name="fastgen_cpu", sources=SOURCES, extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=os.environ.get("FASTGEN_VERBOSE_BUILD") == "1")
    except Exception as exc:  # no compiler, no ninja, a read-only cache folder ...
        return f"building fastgen's CPU kernels failed ({type(exc).__name__}: {str(exc).strip()[:200]})"
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"fastgen_cpu::{name}", fake)
    return None


def _gemv_linear_shape(x, packed, out_features, residual=None, scale=None):
    return x.new_empty(x.shape[0], out_features)


def _decode_attention_shape(q, k_cache, v_cache, cache_rows, span, bias, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


_FAKES = {"gemv_linear": _gemv_linear_shape, "decode_attention": _decode_attention_shape}
