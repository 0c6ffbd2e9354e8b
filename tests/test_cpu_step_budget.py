"""The eager CPU decode step's operator budget: one engine step of a decoder with musicgen-small's structure (24
layers, 4 codebooks) dispatches at most 64 operators (the issue's budget was 250; 731 before the layers ran in one C++
call, 132 before the sampler did: 44 now), in fp32, bf16 and with int8 weights; every dispatch costs Python and often an OpenMP fork/join, whatever it computes. The count depends
on the structure, not the width, so the model is the tiny one with 24 layers."""
from __future__ import annotations

import pytest
import torch

import fastgen
from fastgen.engine.launch_count import count_operators
from fastgen.kernels.cpu_decoder_layers import unavailable_reason
from fastgen.tiny import build_tiny_checkpoint

BUDGET = 64


@pytest.fixture(scope="module")
def small_structure(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-24-layers"), decoder_layers=24)


@pytest.mark.parametrize("dtype,quantization", [(torch.float32, None), (torch.bfloat16, None),
                                                (torch.float32, "int8")], ids=["fp32", "bf16", "int8"])
def test_an_eager_step_dispatches_at_most_64_operators(small_structure, dtype, quantization):
    if unavailable_reason(dtype) is not None:
        pytest.skip(unavailable_reason(dtype))
    engine = fastgen.Engine.from_pretrained(small_structure, device="cpu", max_slots=2, dtype=dtype,
                                            quantization=quantization, max_duration_s=2.0)
    engine.add_request("lofi", fastgen.SamplingParams(duration=2.0, seed=1, top_k=50))
    for _ in range(3):  # admission and the first steps are not the steady state
        engine.step()
    with count_operators() as count:
        engine.step()
    assert isinstance(engine.model.decoder._cpu_layers_args, tuple), "the layers did not run in one call"
    assert count.by_op["fastgen_cpu.decoder_layers"] == 1, str(count)
    assert count.by_op["fastgen_cpu.sample_next_tokens"] == 1, str(count)
    assert count.total <= BUDGET, str(count)
