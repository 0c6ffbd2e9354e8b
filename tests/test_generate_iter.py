"""MusicGen.generate_iter: outputs in completion order, equal to generate's; a failing request never hides the
others' outputs; one call at a time per model (two threads are serialised, a nested call in one thread refused);
closing early leaves nothing running; the stream holds only in-flight work."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import fastgen
from fastgen import RequestFailed, SamplingParams


@pytest.fixture(scope="module")
def model(tiny_mono_dir):
    return fastgen.MusicGen.from_pretrained(tiny_mono_dir, device="cpu", max_slots=2)


def lengths_params(durations, seed=0):
    return [SamplingParams(duration=d, seed=seed + i) for i, d in enumerate(durations)]


def test_completion_order_and_same_outputs_as_generate(model):
    durations = [0.6, 0.1, 0.3, 0.1, 0.2]
    params = lengths_params(durations)
    prompts = ["a", "b", "c", "d", "e"]
    stream = model.generate_iter(prompts, params)
    got = list(stream)
    order = [i for i, _ in got]
    assert sorted(order) == list(range(5))
    assert order != list(range(5))  # the short ones, admitted later, finish before the 0.6 s one
    assert order.index(1) < order.index(0)
    by_index = dict(got)
    assert stream.done == 5 and stream.failed == 0 and stream.in_flight == 0
    assert stream.audio_seconds_done == pytest.approx(stream.audio_seconds_total)
    outs = model.generate(prompts, params)
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out.codes, by_index[i].codes)
        assert out.seed == by_index[i].seed == i


def test_bad_input_raises_at_call_before_any_work(model):
    with pytest.raises(fastgen.RequestError, match="duration"):
        model.generate_iter(["a"], [SamplingParams(duration=999.0)])
    with pytest.raises(fastgen.RequestError, match="on_error"):
        model.generate_iter(["a"], on_error="ignore")
    assert not model.engine.has_unfinished()


@pytest.fixture
def failing_prompt(model, monkeypatch):
    """Requests whose prompt is BOOM fail while starting (admission retries one by one, so they fail alone)."""
    runner = model.engine.runner
    real_start = runner.start

    def start(requests):
        if any(r.prompt == "BOOM" for r in requests):
            raise RuntimeError("injected fault")
        return real_start(requests)

    monkeypatch.setattr(runner, "start", start)
    return "BOOM"


def test_generate_failure_keeps_the_finished_outputs(model, failing_prompt):
    prompts = ["a", failing_prompt, "c", "d"]
    with pytest.raises(RequestFailed) as info:
        model.generate(prompts, lengths_params([0.2] * 4))
    error = info.value
    assert [o is None for o in error.outputs] == [False, True, False, False]
    assert set(error.failures) == {1} and "injected fault" in str(error.failures[1].__cause__ or error.failures[1])
    assert [o.seed for o in error.outputs if o is not None] == [0, 2, 3]
    assert not model.engine.has_unfinished()


def test_generate_iter_failure_modes(model, failing_prompt):
    prompts = [failing_prompt, "b", "c"]
    yielded = list(model.generate_iter(prompts, lengths_params([0.2] * 3), on_error="yield"))
    assert sorted(i for i, _ in yielded) == [0, 1, 2]
    assert isinstance(dict(yielded)[0], RequestFailed)
    seen = []
    with pytest.raises(RequestFailed) as info:
        for index, out in model.generate_iter(prompts, lengths_params([0.2] * 3)):
            seen.append(index)
    assert sorted(seen) == [1, 2]  # the others came out before the error
    assert list(info.value.failures) == [0]


def test_two_threads_are_serialised_and_get_their_own_audio(model):
    params_a = lengths_params([0.3, 0.2, 0.4], seed=100)
    params_b = lengths_params([0.2, 0.3], seed=200)
    expected_a = [o.codes for o in model.generate(["x", "y", "z"], params_a)]
    expected_b = [o.codes for o in model.generate(["p", "q"], params_b)]
    results: dict[str, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def call(key, prompts, params):
        try:
            barrier.wait()
            results[key] = [o.codes for o in model.generate(prompts, params)]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=("a", ["x", "y", "z"], params_a)),
               threading.Thread(target=call, args=("b", ["p", "q"], params_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a generate call hung"
    assert not errors, errors
    for got, want in ((results["a"], expected_a), (results["b"], expected_b)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_nested_call_in_one_thread_is_refused_and_close_cleans_up(model):
    outer = model.generate_iter(["a", "b", "c"], lengths_params([0.4, 0.4, 0.4]))
    first = next(outer)
    with pytest.raises(RuntimeError, match="already running"):
        model.generate(["x"], lengths_params([0.1]))
    outer.close()  # two requests unfinished: aborted, slots freed
    assert first[0] in (0, 1, 2)
    assert not model.engine.has_unfinished()
    assert len(model.generate(["x"], lengths_params([0.1]))) == 1  # the model is free again


def test_stream_holds_only_in_flight_work(model):
    n = 12
    stream = model.generate_iter(["a"] * n, lengths_params([0.1] * n))
    peak = 0
    for _ in stream:
        peak = max(peak, stream.in_flight)
        assert stream._built.count(None) >= stream.done  # queued requests are dropped from the backlog
    limit = model.num_slots * (1 + fastgen.api.QUEUE_AHEAD_PER_SLOT)
    assert 0 < peak <= limit < n


def test_stop_admitting_drops_the_queue_and_finishes_running(model):
    n = 10
    stream = model.generate_iter(["a"] * n, lengths_params([0.3] * n))
    index, _ = next(stream)
    left = stream.stop_admitting()
    rest = [i for i, _ in stream]
    assert len(left) + len(rest) + 1 == n and not set(left) & set(rest)
    assert len(rest) <= model.num_slots  # only what was running when admission stopped
    assert not model.engine.has_unfinished()
