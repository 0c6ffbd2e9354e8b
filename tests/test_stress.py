"""A bounded stress run of the async engine, in the spirit of issue 9's campaign: mixed requests (text, unconditional,
audio prompts, invalid ones) from several threads and asyncio loops, random aborts, impatient callers awaiting with
short timeouts in throw-away loops, and a submit racing shutdown. Every handle must end with a defined outcome,
fixed-seed outputs must equal those of a quiet engine, and no slot may leak."""
from __future__ import annotations

import asyncio
import random
import threading

import numpy as np
import pytest
import torch

import fastgen
from fastgen import EngineConfig, RequestAborted, RequestError, SamplingParams
from fastgen.engine.async_engine import AsyncEngine
from fastgen.engine.engine import Engine
from fastgen.model.musicgen import MusicgenModel

CLIENTS = 4             # threads; two of them drive their requests from asyncio loops
REQUESTS_PER_CLIENT = 12
SEEDED = [("lofi beat", 11), (None, 12), ("ambient pads", 13)]  # checked against a quiet engine


def request_for(rng: random.Random):
    """(prompt, params, audio_prompt) for one random request; about one in six is invalid."""
    kind = rng.randrange(6)
    prompt = rng.choice(["lofi", "jazz trio", None, "x" * rng.randrange(1, 40)])
    params = SamplingParams(max_new_tokens=rng.randrange(4, 24), seed=rng.randrange(2**31),
                            temperature=rng.choice([None, 0.7, 1e-40]), top_k=rng.choice([None, 0, 5, 2**31 - 1]))
    audio = None
    if kind == 1:
        audio = (np.full(rng.randrange(640, 4000), 0.05, np.float32), rng.choice([16_000, 32_000, 44_100]))
    if kind == 2:  # invalid: each must be refused in the caller
        audio = rng.choice([(np.zeros(1, np.float32), 96_000), (np.zeros(100, np.float32), 2**62),
                            (np.zeros(4), 0)])
    return prompt, params, audio


@pytest.fixture(scope="module")
def model(tiny_mono_dir) -> MusicgenModel:
    return MusicgenModel.load(tiny_mono_dir, device="cpu", dtype=torch.float32)


def quiet_outputs(model) -> dict[int, np.ndarray]:
    engine = Engine(model, EngineConfig(backend="torch", max_slots=1))
    requests = [engine.add_request(p, SamplingParams(max_new_tokens=16, seed=s)) for p, s in SEEDED]
    while engine.has_unfinished():
        engine.step()
    return {seed: r.output.codes for (_, seed), r in zip(SEEDED, requests)}


def test_mixed_load_with_aborts_impatient_callers_and_shutdown(model):
    expected = quiet_outputs(model)
    engine = AsyncEngine(Engine(model, EngineConfig(backend="torch", max_slots=3, max_waiting=None)))
    outcomes: list[str] = []
    seeded: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def record(kind: str) -> None:
        with lock:
            outcomes.append(kind)

    def submit(rng):
        prompt, params, audio = request_for(rng)
        try:
            return engine.submit(prompt, params, audio_prompt=audio)
        except RequestError:
            record("refused")
            return None

    def settle(handle) -> None:
        try:
            handle.result(timeout=60)
            record("finished")
        except RequestAborted:
            record("aborted")

    def threaded_client(index: int) -> None:
        rng = random.Random(index)
        try:
            handles = [h for h in (submit(rng) for _ in range(REQUESTS_PER_CLIENT)) if h is not None]
            for handle in handles:
                if rng.random() < 0.25:
                    engine.abort(handle.request_id)
                if rng.random() < 0.3:  # impatient: a throw-away loop that gives up at once
                    try:
                        asyncio.run(asyncio.wait_for(handle, rng.choice([0.0001, 0.001, 0.01])))
                    except (TimeoutError, RequestAborted):
                        pass
            for handle in handles:
                settle(handle)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    def asyncio_client(index: int) -> None:
        rng = random.Random(index)

        async def main():
            handles = [h for h in (submit(rng) for _ in range(REQUESTS_PER_CLIENT)) if h is not None]
            prompt, seed = SEEDED[index % len(SEEDED)]
            mine = engine.submit(prompt, SamplingParams(max_new_tokens=16, seed=seed))
            for handle in handles:
                if rng.random() < 0.25:
                    engine.abort(handle.request_id)
            for handle in handles:
                try:
                    async for _ in handle:  # streams events until the end
                        pass
                    await asyncio.wait_for(handle, 60)
                    record("finished")
                except RequestAborted:
                    record("aborted")
            out = await asyncio.wait_for(mine, 60)
            with lock:
                seeded[seed] = out.codes
        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=asyncio_client if i % 2 else threaded_client, args=(i,))
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors
    assert {"finished", "refused"} <= set(outcomes)
    for seed, codes in seeded.items():  # identical under load, aborts and all
        np.testing.assert_array_equal(codes, expected[seed])
    assert engine._thread.is_alive()

    # a submit racing shutdown: every handle that submit returned ends
    late: list = []

    def racer():
        rng = random.Random(99)
        while True:
            try:
                late.append(engine.submit("late", SamplingParams(max_new_tokens=6, seed=rng.randrange(100))))
            except fastgen.EngineClosed:
                return
    racers = [threading.Thread(target=racer) for _ in range(2)]
    for t in racers:
        t.start()
    while len(late) < 20:
        threading.Event().wait(0.001)
    engine.shutdown_sync()
    for t in racers:
        t.join(timeout=30)
    for handle in late:
        try:
            handle.result(timeout=10)
        except RequestAborted:
            pass
    core = engine.engine
    assert not core.has_unfinished() and not core._active
    assert sorted(core.scheduler.free_slots) == list(range(core.num_slots))
