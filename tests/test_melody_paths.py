"""One engine for both model kinds: a melody checkpoint's requests (melodies, text, unconditional, an audio prompt;
greedy and seeded sampling) give the same codes on every decode path as on the eager torch backend — several steps
per call, text encoded ahead on the stage worker, the Triton kernels (interpreter), graph replay through the CPU stand-in for CUDA graphs, the fused Triton
projections, the compiled step. These paths offset each slot's positions by its prefix (SlotState.prefix_length)."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from melody_reference import MELODY_RATE, melodies

import fastgen
from fastgen.engine.graph_standin import cpu_graphs


def run(folder, graphs: bool = False, **options) -> list[np.ndarray]:
    with cpu_graphs() if graphs else contextlib.nullcontext():
        engine = fastgen.Engine.from_pretrained(folder, max_slots=3, max_duration_s=1.0, dtype=torch.float32,
                                                enforce_eager=not graphs, **options)
    assert (engine.runner.graphs is not None) == graphs
    tunes = melodies()
    audio = (0.3 * np.random.default_rng(2).standard_normal((2, 640 * 3))).astype(np.float32)
    requests = [
        engine.add_request("lofi beat", fastgen.SamplingParams(max_new_tokens=7, do_sample=False, guidance_scale=3.0),
                           melody=(tunes["short"], MELODY_RATE)),
        engine.add_request(None, fastgen.SamplingParams(max_new_tokens=9, seed=3, temperature=0.9, guidance_scale=2.0),
                           melody=(tunes["long"], MELODY_RATE)),
        engine.add_request("jazz", fastgen.SamplingParams(max_new_tokens=5, do_sample=False, guidance_scale=1.0),
                           audio_prompt=(audio, 32000)),
    ]
    while engine.has_unfinished():
        engine.step()
    for request in requests:
        assert request.error is None, request.error
    runner = engine.runner
    assert int(runner.state.position[runner.dummy_slot]) == 0  # padding rows advanced nothing
    return [request.output.codes for request in requests]


@pytest.fixture(scope="module")
def eager(tiny_melody_stereo_dir):
    return run(tiny_melody_stereo_dir, backend="torch")


PATHS = {
    "steps per call": (dict(backend="torch", steps_per_call=4), False),
    "stage worker": (dict(backend="torch", overlap_stages=True), False),  # T5 run ahead, on a thread
    "triton kernels": (dict(backend="triton"), False),
    "graph replay": (dict(backend="triton", graphs=True, steps_per_call=2), True),
    "fused projections": (dict(backend="triton", linear_backend="triton"), True),
    "compiled step": (dict(backend="torch", compile_step=True), True),
}


@pytest.mark.parametrize("path", [pytest.param(name, marks=[pytest.mark.slow] if slow else [])
                                  for name, (_, slow) in PATHS.items()])
def test_every_decode_path_gives_the_eager_codes(tiny_melody_stereo_dir, eager, path):
    options, _ = PATHS[path]
    for i, (got, expected) in enumerate(zip(run(tiny_melody_stereo_dir, **options), eager)):
        np.testing.assert_array_equal(got, expected, err_msg=f"{path}: request {i}")
