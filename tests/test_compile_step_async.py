"""The compiled step served by the AsyncEngine, whose loop thread runs torch with its own intra-op thread count
(in a file of its own so that the compiling tests spread over the suite's workers)."""
from __future__ import annotations

import shutil

import pytest
import torch

import fastgen
from test_compile_step import make_engine

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="inductor's CPU code generation needs a C++ compiler")


@pytest.mark.slow
@pytest.mark.parametrize("construction", ["from_pretrained", "around_an_engine"])
def test_async_engine_serves_the_compiled_step_without_recompiling(tiny_mono_dir, construction):
    """The async loop thread runs torch with its own intra-op thread count, which dynamo guards on: the step is
    compiled for it before serving (up front by from_pretrained; by the loop thread for an Engine built elsewhere).
    Both engines have the same slot count and run the loop at 1 thread: the second compile meets the first one's
    graphs in inductor's cache, as a restarted server would."""
    if construction == "from_pretrained":
        engine = fastgen.AsyncEngine.from_pretrained(tiny_mono_dir, max_slots=3, backend="torch", compile_step=True)
    else:
        with torch.compiler.set_stance("default"):
            engine = fastgen.AsyncEngine(make_engine(tiny_mono_dir, compile_step=True), cpu_threads=1)
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            handles = [engine.submit(f"p{i}", fastgen.SamplingParams(max_new_tokens=8 + 4 * i, seed=i))
                       for i in range(3)]
            outputs = [h.result(timeout=120) for h in handles]
    finally:
        engine.shutdown_sync()
    assert [o.codes.shape[1] for o in outputs] == [5, 9, 13]
