"""Issue 9, item by item: nothing a caller sends can hang the engine, leak into another request or fail late. Each
test reproduces one defect the stress campaign found (it fails on the code before the fix)."""
from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import pytest
import torch

import fastgen
from fastgen import EngineConfig, QueueFull, RequestAborted, RequestError, RequestFailed, SamplingParams
from fastgen.engine.async_engine import AsyncEngine
from fastgen.engine.engine import Engine
from fastgen.model.musicgen import MusicgenModel

SHORT = SamplingParams(max_new_tokens=8, seed=1)


@pytest.fixture(scope="module")
def model(tiny_mono_dir) -> MusicgenModel:
    return MusicgenModel.load(tiny_mono_dir, device="cpu", dtype=torch.float32)


def make_engine(model, **options) -> Engine:
    return Engine(model, EngineConfig(backend="torch", **{"max_slots": 2, **options}))


@pytest.fixture()
def async_engine(model):
    engine = AsyncEngine(make_engine(model))
    yield engine
    engine.shutdown_sync()


def in_thread(fn, timeout: float = 10.0):
    """fn() on another thread, joined with a timeout: a call that hangs fails the test instead of hanging it."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"call did not return within {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_all(engine: Engine) -> None:
    while engine.has_unfinished():
        engine.step()


# ---------------------------------------------------------------------------------------------------- item 1
def test_closed_client_loop_does_not_kill_the_engine(async_engine):
    """The usual way sync code awaits with a timeout, twice: each asyncio.run leaves a closed loop behind."""
    handle = async_engine.submit("slow", SamplingParams(max_new_tokens=150, seed=1))
    for _ in range(2):
        with pytest.raises(TimeoutError):
            asyncio.run(asyncio.wait_for(handle, 0.001))
    assert handle.result(timeout=60).codes.shape == (4, 147)
    assert async_engine._thread.is_alive()
    assert async_engine.submit("after", SHORT).result(timeout=60).codes.shape == (4, 5)


def test_a_failing_listener_does_not_break_the_engine(model):
    engine = make_engine(model)

    def broken(request, kind, payload):
        raise RuntimeError("listener bug")
    engine.listeners.append(broken)
    request = engine.add_request("x", SHORT)
    run_all(engine)
    assert request.status.name == "FINISHED" and request.output is not None


# ---------------------------------------------------------------------------------------------------- item 2
def test_caller_id_equal_to_an_automatic_one(async_engine, model):
    mine = async_engine.submit("mine", SHORT, request_id="req-0")
    auto = [async_engine.submit(f"auto {i}", SHORT) for i in range(2)]
    assert len({mine.request_id, *(h.request_id for h in auto)}) == 3
    assert mine.result(timeout=60).prompt == "mine"
    assert [h.result(timeout=60).prompt for h in auto] == ["auto 0", "auto 1"]
    busy = async_engine.submit("busy", SamplingParams(max_new_tokens=200, seed=1), request_id="dup")
    with pytest.raises(RequestError, match="request_id 'dup'"):
        async_engine.submit("other", SHORT, request_id="dup")
    assert async_engine.abort("dup")
    with pytest.raises(RequestAborted):
        busy.result(timeout=60)
    with pytest.raises(RequestError, match="request_id"):
        async_engine.submit("x", SHORT, request_id=7)

    engine = make_engine(model)  # the synchronous engine too
    first = engine.add_request("mine", SHORT, request_id="req-0")
    second = engine.add_request("auto", SHORT)
    assert second.request_id != "req-0"
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("again", SHORT, request_id="req-0")
    run_all(engine)
    assert (first.output.prompt, second.output.prompt) == ("mine", "auto")


# ---------------------------------------------------------------------------------------------------- item 3
HOSTILE = {
    "rate-2**62": ((np.zeros(3200, np.float32), 2**62), "sample rate"),
    "rate-1-hz": ((np.zeros(10_000, np.float32), 1), "sample rate"),
    "rate-1-hz-40k": ((np.zeros(40_000, np.float32), 1), "sample rate"),
    "too-long-after-resampling": ((np.zeros(1000 * 400, np.float32), 1000), "limit"),  # 400 s: past 300 s
    "one-sample-at-96k": ((np.zeros(1, np.float32), 96_000), "codec frame"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_audio_prompt_is_refused_fast_without_the_lock(async_engine, case):
    audio_prompt, words = HOSTILE[case]
    start = time.perf_counter()
    with async_engine._submit_lock, async_engine.engine.intake.tokenizer_lock:  # other callers hold the locks
        with pytest.raises(RequestError, match=words):
            in_thread(lambda: async_engine.submit("x", SHORT, audio_prompt=audio_prompt))
    assert time.perf_counter() - start < 2.0


def test_huge_prompt_and_bad_text_are_refused_before_tokenising(async_engine):
    limit = 32 * async_engine.engine.config.max_text_tokens
    with async_engine._submit_lock, async_engine.engine.intake.tokenizer_lock:  # other callers hold the locks
        for prompt, words in [("x" * 10_000_000, f"at most {limit}"), ("lofi \ud800 beat", "surrogate")]:
            with pytest.raises(RequestError, match=words) as info:
                in_thread(lambda: async_engine.submit(prompt, SHORT), timeout=2.0)
            assert "prompt" in str(info.value)
        with pytest.raises(RequestError, match="temperature"):
            in_thread(lambda: async_engine.submit("fine", SamplingParams(temperature=-1.0)), timeout=2.0)
    assert async_engine.submit("ok", SHORT).result(timeout=60)


# ---------------------------------------------------------------------------------------------------- item 4
def test_submit_racing_shutdown_leaves_no_handle_hanging(model):
    for trial in range(3):
        engine = AsyncEngine(make_engine(model, max_waiting=None))
        handles: list = []
        stop = threading.Event()

        def client():
            while not stop.is_set():
                try:
                    handles.append(engine.submit("race", SamplingParams(max_new_tokens=4, seed=1)))
                except fastgen.EngineClosed:
                    return
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.1 + 0.05 * trial)
        engine.shutdown_sync()
        stop.set()
        for t in threads:
            t.join()
        assert handles
        for handle in handles:  # every handle ends: finished, or aborted by the shutdown
            try:
                handle.result(timeout=5)
            except RequestAborted:
                pass


# ---------------------------------------------------------------------------------------------------- item 6
@pytest.mark.parametrize("steps_before_abort", [0, 2])
def test_abort_cleans_a_slot_holding_nan(model, steps_before_abort):
    engine = make_engine(model, max_slots=1)
    victim = engine.add_request("victim", SamplingParams(max_new_tokens=30, seed=1))
    engine.step()
    engine.runner.cache.self_k[:, victim.slot] = float("nan")
    for _ in range(steps_before_abort):
        engine.step()
    assert engine.abort(victim.request_id) is True
    after = engine.add_request("next", SHORT)
    run_all(engine)
    assert after.status.name == "FINISHED", after.error
    reference = make_engine(model, max_slots=1)
    ref = reference.add_request("next", SHORT)
    run_all(reference)
    np.testing.assert_array_equal(after.output.codes, ref.output.codes)


# ---------------------------------------------------------------------------------------------------- item 7
def test_nan_audio_is_a_failure(model):
    weight = next(p for p in model.codec.model.decoder.parameters())
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.view(-1)[0] = float("nan")
        engine = make_engine(model)
        request = engine.add_request("x", SHORT)
        run_all(engine)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert request.status.name == "FAILED" and request.output is None
    assert isinstance(request.error, RequestFailed) and "non-finite audio" in str(request.error)


# ---------------------------------------------------------------------------------------------------- item 8
HUGE = 10**400
BAD_FIELDS = {
    "top-k-2**31": (dict(top_k=2**31), "top_k"),
    "duration-1e307": (dict(duration=1e307), "duration"),
    "guidance-10**400": (dict(guidance_scale=HUGE), "guidance_scale"),
    "temperature-10**400": (dict(temperature=HUGE), "temperature"),
    "top-p-10**400": (dict(top_p=HUGE), "top_p"),
    "duration-10**400": (dict(duration=HUGE), "duration"),
    "max-new-tokens-10**400": (dict(max_new_tokens=HUGE), "max_new_tokens"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_out_of_range_numbers_name_the_field(case):
    fields, name = BAD_FIELDS[case]
    with pytest.raises(RequestError, match=name) as info:
        SamplingParams(**fields)
    assert len(str(info.value)) < 300  # the value is cut short in the message


def test_vanishing_temperature_or_top_p_is_greedy(model):
    engine = make_engine(model, max_slots=4)
    kinds = {"greedy": SamplingParams(max_new_tokens=30, do_sample=False, seed=5),
             "temperature": SamplingParams(max_new_tokens=30, temperature=1e-40, seed=5),
             "top_p": SamplingParams(max_new_tokens=30, top_p=1e-50, seed=5)}
    requests = {k: engine.add_request("lofi", p) for k, p in kinds.items()}
    run_all(engine)
    for kind in ("temperature", "top_p"):
        np.testing.assert_array_equal(requests[kind].output.codes, requests["greedy"].output.codes)


def test_top_k_at_the_int32_limit_runs_as_no_filter(model):
    engine = make_engine(model)
    top = engine.add_request("lofi", SamplingParams(max_new_tokens=12, top_k=2**31 - 1, seed=4))
    off = engine.add_request("lofi", SamplingParams(max_new_tokens=12, top_k=0, seed=4))
    run_all(engine)
    np.testing.assert_array_equal(top.output.codes, off.output.codes)


@pytest.mark.parametrize("budget", [math.nan, math.inf, -1.0])
def test_kv_cache_budget_must_be_finite(budget):
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        EngineConfig(kv_cache_memory_bytes=budget)


# ---------------------------------------------------------------------------------------------------- item 10
def gate_decoding(engine: Engine):
    """Hold EnCodec (on the stage worker) until the returned event is set."""
    release, entered = threading.Event(), threading.Event()
    decode = engine.stages._work_fns["decode"]

    def gated(codes):
        entered.set()
        release.wait(30)
        return decode(codes)
    engine.stages._work_fns["decode"] = gated
    return release, entered


def test_abort_during_encodec_decoding_takes_effect(model):
    core = make_engine(model, overlap_stages=True)
    release, entered = gate_decoding(core)
    engine = AsyncEngine(core)
    try:
        handle = engine.submit("x", SHORT)
        assert entered.wait(30)
        assert engine.abort(handle.request_id) is True
        with pytest.raises(RequestAborted):
            handle.result(timeout=5)
        assert engine.abort(handle.request_id) is False  # once only
        release.set()
        done = engine.submit("y", SHORT)
        assert done.result(timeout=60).codes.shape == (4, 5)
        assert engine.abort(done.request_id) is False  # finished: abort says it did nothing
        assert done.result(timeout=1).codes.shape == (4, 5)
        assert engine.abort("no-such-request") is False
    finally:
        release.set()
        engine.shutdown_sync()


def test_sync_abort_during_decoding_drops_the_audio(model):
    core = make_engine(model, overlap_stages=True)
    release, entered = gate_decoding(core)
    request = core.add_request("x", SHORT)
    while request.status.name != "DECODING":
        core.step()
    assert entered.wait(30)
    assert core.abort(request.request_id) is True and core.abort(request.request_id) is False
    release.set()
    run_all(core)
    assert request.status.name == "ABORTED" and request.output is None
    core.close()


def test_one_encodec_fault_fails_only_its_request(model):
    engine = make_engine(model, max_slots=3)
    poisoned: set[int] = set()
    finish, decode = engine.runner.finish, engine.stages._work_fns["decode"]

    def marking_finish(requests):  # (one call for all the requests finishing in a step)
        results = finish(requests)
        for request, (codes, _) in zip(requests, results):
            if request.request_id == "bad":
                poisoned.add(id(codes))
        return results

    def faulty_decode(codes):
        if any(id(c) in poisoned for c in codes):
            raise RuntimeError("EnCodec fault")
        return decode(codes)
    engine.runner.finish = marking_finish
    engine.stages._work_fns["decode"] = faulty_decode
    requests = [engine.add_request(f"p{i}", SHORT, request_id=rid) for i, rid in enumerate(["a", "bad", "b"])]
    run_all(engine)
    assert [r.status.name for r in requests] == ["FINISHED", "FAILED", "FINISHED"]
    assert "EnCodec fault" in str(requests[1].error)


def test_max_waiting_bounds_the_queue(model):
    engine = make_engine(model, max_slots=1, max_waiting=2)
    for i in range(2):
        engine.add_request(f"p{i}", SHORT)
    with pytest.raises(QueueFull, match="max_waiting=2"):
        engine.add_request("one too many", SHORT)
    run_all(engine)
    engine.add_request("room again", SHORT)
    run_all(engine)

    served = AsyncEngine(make_engine(model, max_slots=1, max_waiting=3))
    try:
        handles = []
        with pytest.raises(QueueFull, match="max_waiting=3") as info:
            for i in range(10):
                handles.append(served.submit(f"p{i}", SamplingParams(max_new_tokens=100, seed=i)))
        assert isinstance(info.value, RequestError)
        assert 3 <= len(handles) <= 4  # those waiting, and perhaps one already started
        for handle in handles:
            handle.result(timeout=60)
        assert served.submit("room again", SHORT).result(timeout=60)
    finally:
        served.shutdown_sync()


def test_max_waiting_is_validated():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_waiting"):
            EngineConfig(max_waiting=bad)
    assert EngineConfig().max_waiting == 256 and EngineConfig(max_waiting=None).max_waiting is None


# ---------------------------------------------------------------------------------------------------- item 11
def test_error_types_have_the_built_in_bases(tmp_path):
    assert issubclass(fastgen.CheckpointError, OSError) and issubclass(fastgen.CheckpointError, ValueError)
    assert issubclass(QueueFull, RequestError) and issubclass(RequestError, ValueError)
    assert issubclass(RequestFailed, RuntimeError) and issubclass(RequestAborted, RuntimeError)
    assert issubclass(fastgen.EngineClosed, RuntimeError)
    for error in (fastgen.CheckpointError, RequestError, QueueFull, RequestFailed, RequestAborted,
                  fastgen.EngineClosed):
        assert issubclass(error, fastgen.FastgenError)
    try:  # code written for transformers
        fastgen.MusicGen.from_pretrained(tmp_path / "absent")
    except OSError as exc:
        assert "absent" in str(exc)
    else:
        raise AssertionError("no error")


def test_a_dying_loop_ends_every_handle_and_refuses_new_work(model):
    """Should the loop thread itself break (a bug), nothing may hang: handles fail, submit refuses, shutdown returns."""
    core = make_engine(model)
    engine = AsyncEngine(core)

    def broken(*args, **kwargs):
        raise RuntimeError("bug in the loop")
    core.step = broken
    core.fail = broken
    handle = engine.submit("x", SHORT)
    with pytest.raises(RequestFailed, match="loop died"):
        handle.result(timeout=30)
    with pytest.raises(fastgen.EngineClosed, match="died"):
        engine.submit("y", SHORT)
    in_thread(engine.shutdown_sync)
