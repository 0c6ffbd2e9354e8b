"""compile_step: the torch backend's decode step through torch.compile (inductor, C++ wrapper on a CPU) gives the
same codes as the eager step, across a workload whose batch size, read spans and sampling settings change."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import fastgen
from fastgen.engine.request import RequestStatus
from fastgen.model.decoder import KVCache
from fastgen.model.musicgen import MusicgenModel
from fastgen.model.ops import TorchOps

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="inductor's CPU code generation needs a C++ compiler")


def make_engine(folder, compile_step: bool, steps_per_call: int = 1, quantization: str | None = None
                ) -> fastgen.Engine:
    return fastgen.Engine.from_pretrained(folder, max_slots=3, backend="torch", compile_step=compile_step,
                                          steps_per_call=steps_per_call, dtype=torch.float32,
                                          quantization=quantization)


def run_workload(engine: fastgen.Engine):
    requests = []
    for i in range(5):  # joins and retirements change the batch size; 70 positions cross a 64-position read span
        params = fastgen.SamplingParams(max_new_tokens=[70, 20, 30, 12, 25][i], guidance_scale=[3.0, 1.0, 2.0][i % 3],
                                        do_sample=i != 1, top_k=[0, 0, 8, 250, 0][i], top_p=[1.0, 1.0, 1.0, 1.0, 0.9][i],
                                        temperature=0.9, seed=i)
        # request 2's long prompt reads more text than self-attention cache at first, and less later on
        prompt = None if i == 3 else " ".join(["a much longer prompt"] * 5) if i == 2 else f"prompt {i}"
        requests.append(engine.add_request(prompt, params))
        engine.step()
    while engine.has_unfinished():
        engine.step()
    assert all(r.status == RequestStatus.FINISHED for r in requests), [r.error for r in requests]
    return [r.output.codes for r in requests]


@pytest.mark.slow
def test_compiled_step_matches_the_eager_step(tiny_mono_dir):
    eager = run_workload(make_engine(tiny_mono_dir, compile_step=False))
    torch._dynamo.reset()
    counters.clear()
    # as if other compiled engines had used up dynamo's per-function graph limit: start-up must still compile
    with torch._dynamo.config.patch(recompile_limit=1):  # (not monkeypatch: its undo would delete the setting)
        # compiles here, before serving; two steps per call as well: their codes are those of one step per call
        engine = make_engine(tiny_mono_dir, compile_step=True, steps_per_call=2)
    assert counters["stats"]["unique_graphs"] == 3  # see ModelRunner._compile_step
    # the graphs made at start-up serve batches of 1 to 3 requests with growing read spans: any recompile while
    # serving (seconds each; past dynamo's limit the step would silently run eagerly) raises here
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = run_workload(engine)
    for a, b in zip(eager, compiled):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8-dynamic", "int4"])
def test_compiled_quantized_step_serves_without_recompiles(tiny_mono_dir, quantization):
    """The CPU's fastest configurations (fastgen.model.linear): fbgemm's packed int8 weights, which dynamo cannot
    trace, run inside the compiled step as the custom operator fastgen::opaque_linear; aten's int4 kernel runs as
    itself. int4: the same codes as the eager step. int8-dynamic rounds each projection's input to 8 bits, so the
    compiled step's last-bit differences (inductor's fused layer norms and attention) now and then carry an input
    across a rounding boundary, a whole 8-bit step, and the sampled codes part ways after a few frames: its decode
    is compared one step at a time below instead."""
    eager = run_workload(make_engine(tiny_mono_dir, compile_step=False, quantization=quantization))
    with torch._dynamo.config.patch(recompile_limit=64):
        engine = make_engine(tiny_mono_dir, compile_step=True, quantization=quantization)
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = run_workload(engine)
    for a, b in zip(eager, compiled):
        assert a.shape == b.shape
        if quantization == "int4":
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_compiled_dynamic_int8_decode_matches_eager_logits(tiny_mono_dir):
    model = MusicgenModel.load(tiny_mono_dir, dtype=torch.float32, quantization="int8-dynamic")
    decoder, ops = model.decoder, TorchOps()
    gen = torch.Generator().manual_seed(0)
    cache = KVCache.allocate(decoder.config, 1, 16, 4, torch.float32, torch.device("cpu"))
    for tensor in (cache.self_k, cache.self_v, cache.cross_k, cache.cross_v):
        tensor.copy_(torch.randn(tensor.shape, generator=gen))
    cache.cross_k[:, 1] = cache.cross_v[:, 1] = 0  # the uncond row has no text: its cross K/V are zeros
    rows, text_length = torch.tensor([0, 1]), torch.tensor([3, 0], dtype=torch.int32)

    def decode(hidden: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        ctx = ops.context(rows, position, text_length, 8, 4, torch.float32)
        return decoder.decode(ops, hidden, cache, ctx)
    hidden, position = torch.randn(2, decoder.config.hidden_size, generator=gen), torch.tensor([5, 5])
    with torch.inference_mode():
        eager = decode(hidden, position)
        compiled = torch.compile(decode, fullgraph=True, options={"cpp_wrapper": True})(hidden, position)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_compile_step_with_the_triton_backend_is_refused(tiny_mono_dir, device):
    with pytest.raises(ValueError, match="compile_step applies to the torch backend"):  # (Triton needs CUDA or the
        fastgen.Engine.from_pretrained(tiny_mono_dir, device=device, max_slots=1, backend="triton",  # interpreter)
                                       dtype=torch.float32, compile_step=True)


def test_compile_step_must_be_a_bool():
    with pytest.raises(ValueError, match="compile_step must be True or False"):
        fastgen.EngineConfig(compile_step="yes")


@pytest.mark.slow
def test_a_failing_compile_is_a_clear_error(tiny_mono_dir, monkeypatch):
    def broken_compile(fn, **options):
        def run(*args, **kwargs):
            raise OSError("C++ compiler not found\n(long inductor traceback)")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(RuntimeError, match=r"compile_step=True: torch.compile could not compile the decode step "
                                           r"\(OSError: C\+\+ compiler not found\); use compile_step=False"):
        make_engine(tiny_mono_dir, compile_step=True)
