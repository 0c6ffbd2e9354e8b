"""The CPU kernels' AVX2 variants on a CPU that would pick AVX-512: the GEMV (float and int8) and attention tests
rerun in a subprocess with FASTGEN_CPU_ISA=avx2, which keeps the C++ kernels on their AVX2 code (on an AVX2-only CPU
the plain run of those tests already covers it)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # see pyproject's markers: the quick tier leaves it out


@pytest.mark.skipif(not torch.cpu._is_avx512_supported(),
                    reason="this CPU has no AVX-512: the plain GEMV and attention tests run the AVX2 kernels")
def test_avx2_kernels_on_an_avx512_cpu():
    here = Path(__file__).parent
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
                           str(here / "test_cpu_gemv.py"), str(here / "test_cpu_attention.py"),
                           str(here / "test_quantize.py") + "::test_cpu_int8_linear_matches_reference",
                           "-k", "not compiled_graph"],  # the compiled-graph tests trace the same operators
                          env=dict(os.environ, FASTGEN_CPU_ISA="avx2"), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout, done.stdout[-2000:]
