"""Graph mode on the CPU: engines on the triton backend (interpreter) with enforce_eager=False capture DecodeGraphs
through the stand-in of fastgen.engine.graph_standin, which replays exactly the recorded operators, so whatever a
CUDA graph would freeze (Python scalars, host-side branches, host-made tensors) is frozen here too. A continuous-
batching workload gives the eager engine's codes; planted graph bugs are caught."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import fastgen
from fastgen.engine.graph_standin import cpu_graphs
from fastgen.model.ops import TritonOps

STEPS_PER_CALL = 4


def workload(channels: int) -> dict[int, list[tuple]]:
    """Engine step → requests added before it. The batch goes 2 → 3 → 1 (max_slots 3: buckets 2, 3, 1): a join while
    two run, two retirements in one call, one the step after; greedy and seeded sampling, guided and not, an audio
    prompt. Sampling without top-k/top-p: their bisection is slow in the interpreter and involves no host value."""
    rng = np.random.default_rng(3)
    audio = (0.3 * rng.standard_normal((channels, 640 * 2))).astype(np.float32)
    greedy = dict(do_sample=False)
    return {
        0: [("lofi beat", fastgen.SamplingParams(max_new_tokens=6, guidance_scale=3.0, **greedy), None),
            ("jazz piano", fastgen.SamplingParams(max_new_tokens=11, seed=7, temperature=0.8, guidance_scale=2.0),
             (audio, 32000))],
        1: [(None, fastgen.SamplingParams(max_new_tokens=4, guidance_scale=1.0, **greedy), None),],
    }


def run(folder, channels: int, backend: str, graphs: bool = False) -> tuple[dict[str, np.ndarray], list[int]]:
    """Codes per request and the graph bucket of each engine step (empty when eager)."""
    with cpu_graphs() if graphs else contextlib.nullcontext():
        engine = fastgen.Engine.from_pretrained(folder, max_slots=3, backend=backend, max_duration_s=1.0,
                                                dtype=torch.float32, steps_per_call=STEPS_PER_CALL,
                                                enforce_eager=not graphs)
    assert (engine.runner.graphs is not None) == graphs
    schedule, codes, buckets = workload(channels), {}, []
    step = 0
    while schedule or engine.has_unfinished():
        for prompt, params, audio in schedule.pop(step, []):
            engine.add_request(prompt, params, audio_prompt=audio, request_id=f"{step}:{prompt}")
        ended = engine.step()
        if graphs and engine._plan is not None:
            buckets.append(engine._plan.bucket)
        for request in ended:
            assert request.error is None, request.error
            codes[request.request_id] = request.output.codes
        step += 1
    assert len(codes) == 3
    runner = engine.runner  # padding rows advanced nothing: the sampler keeps the dummy slot at position 0
    assert int(runner.state.position[runner.dummy_slot]) == 0
    return codes, buckets


@pytest.mark.slow
def test_graph_replay_matches_eager_under_continuous_batching(tiny_stereo_dir):
    """Graph replay on the kernels against the eager torch backend (cheap here; it gives the eager kernels' codes
    exactly: tests/test_triton_backend.py), stereo, steps_per_call 4."""
    eager, _ = run(tiny_stereo_dir, 2, "torch")
    replayed, buckets = run(tiny_stereo_dir, 2, "triton", graphs=True)
    assert buckets == [2, 3, 1], buckets
    for request_id, want in eager.items():
        np.testing.assert_array_equal(replayed[request_id], want, err_msg=request_id)


class HostCounter:
    """A planted graph bug: the self-attention bound passed to the kernel as a Python int from a host-side step
    counter, right eagerly for a batch that starts together, frozen at its capture-time value in a graph."""

    def __init__(self) -> None:
        self.steps = 0

    def patch(self, monkeypatch) -> None:
        counter = self
        begin_step, self_attention = TritonOps.begin_step, TritonOps.self_attention

        def counted_begin_step(ops, *args, **kwargs):
            counter.steps += 1
            return begin_step(ops, *args, **kwargs)

        def bounded_self_attention(ops, ctx, k_cache, v_cache, q, k, v, scale):
            return ops._attention_append(q, k, v, k_cache, v_cache, ctx.rows, ctx.self_length, scale,
                                         max_length=counter.steps)  # positions 0 .. steps - 1 are filled

        monkeypatch.setattr(TritonOps, "begin_step", counted_begin_step)
        monkeypatch.setattr(TritonOps, "self_attention", bounded_self_attention)


def planted_run(folder, backend: str, graphs: bool = False) -> np.ndarray:
    with cpu_graphs() if graphs else contextlib.nullcontext():
        engine = fastgen.Engine.from_pretrained(folder, max_slots=1, backend=backend, max_duration_s=1.0,
                                                dtype=torch.float32, enforce_eager=not graphs)
    request = engine.make_request("lofi beat", fastgen.SamplingParams(max_new_tokens=10, do_sample=False,
                                                                      guidance_scale=3.0))
    engine.run([request])
    return request.output.codes


def test_planted_host_scalar_is_frozen_by_the_graph(tiny_mono_dir, monkeypatch):
    correct = planted_run(tiny_mono_dir, "torch")  # = the triton backend's codes (tests/test_triton_backend.py)
    counter = HostCounter()
    counter.patch(monkeypatch)
    np.testing.assert_array_equal(planted_run(tiny_mono_dir, "triton"), correct)  # the bug is invisible eagerly
    counter.steps = 0
    replayed = planted_run(tiny_mono_dir, "triton", graphs=True)
    assert counter.steps == 3  # two warm-up steps and the capture ran the Python step; replays do not
    assert not np.array_equal(replayed, correct), \
        "graph replay reproduced eager codes although the kernel got a frozen per-step Python int"


def test_planted_host_sync_fails_capture(tiny_mono_dir, monkeypatch):
    """Reading a device value on the host inside the step (here to bound the attention) fails at capture, as CUDA's
    stream capture does (the eager warm-up before it runs the same code without complaint)."""
    def synced_self_attention(ops, ctx, k_cache, v_cache, q, k, v, scale):
        return ops._attention_append(q, k, v, k_cache, v_cache, ctx.rows, ctx.self_length, scale,
                                     max_length=int(ctx.self_length.max()))

    monkeypatch.setattr(TritonOps, "self_attention", synced_self_attention)
    with cpu_graphs(), pytest.raises(RuntimeError, match="graph capture"):
        fastgen.Engine.from_pretrained(tiny_mono_dir, max_slots=1, backend="triton", max_duration_s=1.0,
                                       dtype=torch.float32)
