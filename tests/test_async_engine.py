"""AsyncEngine for serving stacks: submit returns at once, events stream, outputs await, abort frees the slot,
bad input fails in the caller, submissions from many threads are safe, shutdown ends what is left."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import fastgen
from fastgen.engine.async_engine import AsyncEngine


@pytest.fixture()
def engine(tiny_mono_dir):
    eng = AsyncEngine.from_pretrained(tiny_mono_dir, max_slots=2, backend="torch")
    yield eng
    eng.shutdown_sync()


def test_submit_stream_and_await(engine):
    async def main():
        params = fastgen.SamplingParams(max_new_tokens=30, seed=3)
        handle = engine.submit("lofi beat", params)
        assert handle.request_id
        kinds, progress = [], []
        async for event in handle:
            kinds.append(event.kind)
            if event.kind == "progress":
                progress.append((event.frames_done, event.frames_total))
        out = await handle
        return kinds, progress, out

    kinds, progress, out = asyncio.run(main())
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "finished"
    assert progress and progress[-1] == (30, 30)
    assert [p[0] for p in progress] == sorted(p[0] for p in progress)
    assert isinstance(out, fastgen.GenerationOutput) and out.codes.shape == (4, 27)


def test_abort_running_request_raises_and_frees_slot(engine):
    async def main():
        victim = engine.submit("long one", fastgen.SamplingParams(max_new_tokens=400, seed=1))
        async for event in victim:
            if event.kind == "progress":
                break
        assert engine.abort(victim.request_id) is True
        with pytest.raises(fastgen.RequestAborted):
            await victim
        after = [engine.submit(f"next {i}", fastgen.SamplingParams(max_new_tokens=10, seed=i)) for i in range(2)]
        return [await h for h in after]

    outs = asyncio.run(main())
    assert len(outs) == 2 and all(o.codes.shape == (4, 7) for o in outs)
    assert len(engine.engine.scheduler.free_slots) == 2


def test_bad_input_raises_in_caller_and_engine_keeps_serving(engine):
    with pytest.raises(fastgen.RequestError, match="temperature"):
        engine.submit("x", fastgen.SamplingParams(max_new_tokens=5, temperature=0.0))
    with pytest.raises(fastgen.RequestError):
        engine.submit(123, fastgen.SamplingParams(max_new_tokens=5))  # type: ignore[arg-type]
    out = engine.submit("fine", fastgen.SamplingParams(max_new_tokens=8, seed=0)).result(timeout=60)
    assert out.codes.shape == (4, 5)


def test_failed_request_is_isolated(engine):
    bad = engine.submit("bad", fastgen.SamplingParams(max_new_tokens=60, seed=1))
    good = engine.submit("good", fastgen.SamplingParams(max_new_tokens=20, seed=2))
    while bad.request_id not in {r.request_id for r in engine.engine.scheduler.running.values()}:
        threading.Event().wait(0.01)
    slot = next(r.slot for r in engine.engine.scheduler.running.values() if r.request_id == bad.request_id)
    engine.engine.runner.cache.self_k[:, slot] = float("nan")
    with pytest.raises(fastgen.RequestFailed, match="non-finite"):
        bad.result(timeout=60)
    assert good.result(timeout=60).codes.shape == (4, 17)


def test_many_threads_submit_concurrently(engine):
    results: dict[int, np.ndarray] = {}

    def client(i: int) -> None:
        handle = engine.submit(f"thread {i}", fastgen.SamplingParams(max_new_tokens=6 + i, seed=i))
        results[i] = handle.result(timeout=120).codes

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(6))
    assert all(results[i].shape == (4, 6 + i - 3) for i in range(6))


def test_shutdown_aborts_pending(tiny_mono_dir):
    eng = AsyncEngine.from_pretrained(tiny_mono_dir, max_slots=1, backend="torch")

    async def main():
        handles = [eng.submit(f"p{i}", fastgen.SamplingParams(max_new_tokens=300, seed=i)) for i in range(3)]
        await asyncio.sleep(0.05)
        await eng.shutdown()
        for h in handles:
            with pytest.raises(fastgen.RequestAborted):
                await h
        with pytest.raises(fastgen.FastgenError, match="shut down"):
            eng.submit("late", fastgen.SamplingParams(max_new_tokens=5))

    asyncio.run(main())


def test_stage_worker_thread_and_late_abort(tiny_mono_dir):
    """T5 and EnCodec on the stage worker thread (the CUDA default): outputs arrive, and aborting a request that has
    left its slot (decoding or done) neither fails it nor stalls the loop."""
    eng = AsyncEngine.from_pretrained(tiny_mono_dir, max_slots=2, backend="torch", overlap_stages=True)
    try:
        handles = [eng.submit(f"p{i}", fastgen.SamplingParams(max_new_tokens=8 + i, seed=i)) for i in range(3)]
        first = handles[0].result(timeout=60)
        eng.abort(handles[0].request_id)
        outs = [h.result(timeout=60) for h in handles[1:]]
        assert first.codes.shape == (4, 5) and [o.codes.shape[1] for o in outs] == [6, 7]
        assert eng.submit("after", fastgen.SamplingParams(max_new_tokens=6, seed=9)).result(timeout=60)
    finally:
        eng.shutdown_sync()
