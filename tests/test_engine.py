"""Continuous batching: a request's codes do not depend on when it joins or who it runs with; mixed workloads all
complete; abort frees the slot; over-capacity requests queue; impossible ones are refused; failures stay isolated;
no slot leaks."""
from __future__ import annotations

import numpy as np
import pytest

import fastgen
from fastgen.engine.request import RequestStatus


def run_all(engine: fastgen.Engine, max_steps: int = 100_000) -> None:
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return
        engine.step()
    raise AssertionError("engine did not drain")


def codes_alone(folder, prompt, params, audio=None):
    engine = fastgen.Engine.from_pretrained(folder, max_slots=1, backend="torch")
    request = engine.add_request(prompt, params, audio)
    run_all(engine)
    return request.output.codes


@pytest.mark.parametrize("params", [
    fastgen.SamplingParams(max_new_tokens=25, do_sample=False, guidance_scale=3.0),
    fastgen.SamplingParams(max_new_tokens=25, seed=99, top_k=8, top_p=0.95, temperature=0.9, guidance_scale=2.0),
], ids=["greedy", "seeded-sampling"])
def test_joining_a_busy_batch_mid_way_changes_nothing(tiny_mono_dir, params):
    expected = codes_alone(tiny_mono_dir, "late arrival", params)
    engine = fastgen.Engine.from_pretrained(tiny_mono_dir, max_slots=3, backend="torch")
    engine.add_request("first", fastgen.SamplingParams(max_new_tokens=40, seed=1))
    engine.add_request(None, fastgen.SamplingParams(max_new_tokens=12, seed=2, guidance_scale=1.0))
    for _ in range(7):
        engine.step()
    late = engine.add_request("late arrival", params)
    run_all(engine)
    np.testing.assert_array_equal(late.output.codes, expected)


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_mixed_workload_completes(tiny_mono_dir, tiny_stereo_dir, layout):
    folder = tiny_mono_dir if layout == "mono" else tiny_stereo_dir
    engine = fastgen.Engine.from_pretrained(folder, max_slots=3, backend="torch")
    channels = 2 if layout == "stereo" else 1
    rng = np.random.default_rng(0)
    requests = []
    for i in range(9):
        audio = None
        if i % 3 == 2:  # audio prompt, at another sample rate and channel count than the model's
            audio = (rng.standard_normal((3 - channels, 16000 // (i + 1))).astype(np.float32) * 0.2, 16000)
        prompt = None if i % 4 == 1 else f"prompt number {i}"
        params = fastgen.SamplingParams(max_new_tokens=6 + 3 * i, guidance_scale=[1.0, 3.0, 5.0][i % 3],
                                        do_sample=i % 2 == 0, top_k=[0, 5, 50][i % 3], seed=i)
        requests.append(engine.add_request(prompt, params, audio))
    run_all(engine)
    for i, request in enumerate(requests):
        assert request.status == RequestStatus.FINISHED, request.error
        out = request.output
        new_frames = 6 + 3 * i + 1 - 4
        assert out.codes.shape == (engine.model.config.decoder.num_codebooks, out.prompt_frames + new_frames)
        assert out.audio.shape == (channels, out.codes.shape[1] * 640)
        assert np.isfinite(out.audio).all()
        assert (out.codes >= 0).all() and (out.codes < engine.model.config.decoder.vocab_size).all()
    assert engine.scheduler.free_slots and len(engine.scheduler.free_slots) == engine.num_slots


def test_abort_frees_the_slot_and_leaves_others_alone(tiny_mono_dir):
    keep = fastgen.SamplingParams(max_new_tokens=20, seed=5)
    expected = codes_alone(tiny_mono_dir, "keeper", keep)
    engine = fastgen.Engine.from_pretrained(tiny_mono_dir, max_slots=2, backend="torch")
    victim = engine.add_request("victim", fastgen.SamplingParams(max_new_tokens=200, seed=4))
    keeper = engine.add_request("keeper", keep)
    waiting = engine.add_request("waiting", fastgen.SamplingParams(max_new_tokens=10, seed=6))
    for _ in range(3):
        engine.step()
    assert waiting.status == RequestStatus.WAITING
    assert engine.abort(victim.request_id)
    assert victim.status == RequestStatus.ABORTED and isinstance(victim.error, fastgen.RequestAborted)
    assert victim.slot in engine.scheduler.free_slots  # freed at once
    engine.step()
    assert waiting.status == RequestStatus.RUNNING  # took the slot on the next step
    run_all(engine)
    np.testing.assert_array_equal(keeper.output.codes, expected)
    assert waiting.status == RequestStatus.FINISHED
    assert not engine.abort("no-such-request")


def test_over_capacity_queues_and_impossible_is_refused(tiny_mono_dir):
    engine = fastgen.Engine.from_pretrained(tiny_mono_dir, max_slots=2, backend="torch")
    requests = [engine.add_request(f"p{i}", fastgen.SamplingParams(max_new_tokens=8, seed=i)) for i in range(5)]
    engine.step()
    assert sum(r.status == RequestStatus.RUNNING for r in requests) == 2
    assert sum(r.status == RequestStatus.WAITING for r in requests) == 3
    with pytest.raises(fastgen.RequestError, match="over the limit"):
        engine.add_request("too long", fastgen.SamplingParams(duration=600.0))
    run_all(engine)
    assert all(r.status == RequestStatus.FINISHED for r in requests)


def test_non_finite_logits_fail_only_that_request(tiny_mono_dir):
    good_params = fastgen.SamplingParams(max_new_tokens=15, seed=11)
    expected = codes_alone(tiny_mono_dir, "good", good_params)
    engine = fastgen.Engine.from_pretrained(tiny_mono_dir, max_slots=2, backend="torch")
    bad = engine.add_request("bad", fastgen.SamplingParams(max_new_tokens=15, seed=10))
    good = engine.add_request("good", good_params)
    engine.step()
    engine.runner.cache.self_k[:, bad.slot] = float("nan")  # a fault in one request's cache rows → NaN logits
    run_all(engine)
    assert bad.status == RequestStatus.FAILED
    assert isinstance(bad.error, fastgen.RequestFailed) and "non-finite" in str(bad.error)
    np.testing.assert_array_equal(good.output.codes, expected)
    after = engine.add_request("good", good_params)  # the slot is clean for the next request
    run_all(engine)
    np.testing.assert_array_equal(after.output.codes, expected)


def test_no_slot_leaks_after_hundreds_of_mixed_requests(tiny_mono_dir):
    """240 requests through 8 slots (each slot reused ~30 times): unconditional and text prompts, audio prompts,
    greedy and sampled, guidance on and off, aborts while waiting or running; every slot free at the end. (It was
    1000 requests: the same reuse pattern, 4x the time.)"""
    # max_waiting=None: hundreds wait at once here, past the default bound (tests/test_hardening.py checks that)
    engine = fastgen.Engine.from_pretrained(tiny_mono_dir, max_slots=8, backend="torch", max_waiting=None)
    total = 240
    rng = np.random.default_rng(1)
    audio = (rng.standard_normal(640 * 3) * 0.2).astype(np.float32)
    requests, aborted = [], 0
    for i in range(total):
        params = fastgen.SamplingParams(max_new_tokens=int(rng.integers(4, 9)), seed=i,
                                        guidance_scale=float(rng.choice([1.0, 3.0])),
                                        do_sample=bool(rng.integers(0, 2)))
        prompt = None if i % 5 == 0 else f"clip {i % 17}"
        requests.append(engine.add_request(prompt, params, (audio, 32000) if i % 20 == 7 else None))
        if i % 10 == 9:
            engine.step()
        if i % 23 == 0:
            aborted += engine.abort(requests[-1].request_id)
    run_all(engine)
    statuses = [r.status for r in requests]
    assert statuses.count(RequestStatus.ABORTED) == aborted
    assert statuses.count(RequestStatus.FINISHED) == total - aborted
    assert sorted(engine.scheduler.free_slots) == list(range(engine.num_slots))
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_stages_on_a_worker_thread_give_the_same_outputs(tiny_mono_dir):
    """T5 and EnCodec off the decode loop (the CUDA default, forced here on the CPU) change nothing but timing (T5
    then encodes the prompts queued together as one batch, ahead of admission), and an output's codes are its own
    (not a view of the slot's buffer, which the next request overwrites)."""
    outputs = run_both_modes(tiny_mono_dir)
    for inline, threaded in zip(outputs[False], outputs[True]):
        np.testing.assert_array_equal(inline.codes, threaded.codes)
        # the worker runs EnCodec with one intra-op thread: reductions may round differently in the last bit
        np.testing.assert_allclose(inline.audio, threaded.audio, atol=1e-5, rtol=0)


def run_both_modes(folder):
    outputs = {}
    for threaded in (False, True):
        engine = fastgen.Engine.from_pretrained(folder, max_slots=2, backend="torch", overlap_stages=threaded)
        requests = [engine.add_request(f"p{i}", fastgen.SamplingParams(max_new_tokens=6 + 4 * i, seed=i))
                    for i in range(5)]
        run_all(engine)
        engine.close()
        assert all(r.status == RequestStatus.FINISHED for r in requests)
        assert engine.stages.completed["encode"] == (1 if threaded else 0)  # the five prompts: one T5 batch
        outputs[threaded] = [r.output for r in requests]
    return outputs


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(tiny_mono_dir, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA device"):
        fastgen.Engine.from_pretrained(tiny_mono_dir, backend="triton", max_slots=1)


def test_abort_while_text_is_encoding_ahead(tiny_mono_dir):
    """With T5 running ahead on the stage worker, a request aborted before its text is ready stays aborted and the
    others complete."""
    engine = fastgen.Engine.from_pretrained(tiny_mono_dir, max_slots=1, backend="torch", overlap_stages=True)
    try:
        requests = [engine.add_request(f"p{i}", fastgen.SamplingParams(max_new_tokens=6, seed=i)) for i in range(3)]
        assert engine.abort(requests[1].request_id)
        run_all(engine)
        assert [r.status for r in requests] == [RequestStatus.FINISHED, RequestStatus.ABORTED,
                                                RequestStatus.FINISHED]
        assert not engine.has_unfinished()
    finally:
        engine.close()


def test_several_steps_per_call_change_nothing(tiny_mono_dir):
    """steps_per_call > 1 (one graph replay per call on CUDA): requests finish inside a call (their slot runs on to
    the call's end on pad tokens, past the trained position range for a full-length request) and join between
    calls, and every request's codes are those of one step per call."""
    rng = np.random.default_rng(3)
    audio = (0.3 * rng.standard_normal((1, 640 * 5))).astype(np.float32)
    results, calls = {}, {}
    for steps_per_call in (1, 4):
        engine = fastgen.Engine.from_pretrained(tiny_mono_dir, max_slots=3, backend="torch",
                                                steps_per_call=steps_per_call)
        full_length = engine.window_frames + engine.model.config.decoder.num_codebooks - 1  # max_new_tokens
        requests = [
            engine.add_request("full length", fastgen.SamplingParams(max_new_tokens=full_length, seed=1)),
            engine.add_request(None, fastgen.SamplingParams(max_new_tokens=13, do_sample=False)),
            engine.add_request("blues", fastgen.SamplingParams(max_new_tokens=22, top_k=5, top_p=0.9, seed=2,
                                                               guidance_scale=2.0), (audio, 32000)),
        ]
        for _ in range(5):
            engine.step()
        requests += [engine.add_request(f"late {i}", fastgen.SamplingParams(max_new_tokens=9 + 5 * i, seed=10 + i))
                     for i in range(3)]
        steps = 5
        while engine.has_unfinished():
            engine.step()
            steps += 1
        assert all(r.status == RequestStatus.FINISHED for r in requests), [r.error for r in requests]
        assert requests[0].output.codes.shape[1] == engine.window_frames
        results[steps_per_call] = [r.output.codes for r in requests]
        calls[steps_per_call] = steps
    for one, several in zip(results[1], results[4]):
        np.testing.assert_array_equal(one, several)
    assert calls[4] < calls[1] / 3


def test_steps_per_call_is_validated():
    for bad in (0, 17, 2.0):
        with pytest.raises(ValueError, match=r"steps_per_call must be an integer in \[1, 16\]"):
            fastgen.EngineConfig(steps_per_call=bad)
