"""The HTTP server, for real: uvicorn on 127.0.0.1 (in this process, or `fastgen serve` as a subprocess for SIGTERM)
and httpx clients. Whole vs streamed files, 32 concurrent clients of which 8 disconnect, every error status, auth,
metrics that add up, graceful shutdown."""
from __future__ import annotations

import asyncio
import base64
import io
import signal
import struct
import time
import wave

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fastgen import AsyncEngine, StreamConfig  # noqa: E402
from fastgen.serve.app import ServerSettings, create_app  # noqa: E402
from serve_checks import LiveServer, start_fastgen_serve  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STREAM = StreamConfig(first_chunk_s=0.1, interval_s=0.3)
GREEDY = {"prompt": "a tune", "duration": 1.2, "do_sample": False, "guidance_scale": 3.0}
TIMEOUT = httpx.Timeout(120.0)


@pytest.fixture(scope="module")
def live(tiny_mono_dir):
    engines = []

    def factory():
        engines.append(AsyncEngine.from_pretrained(tiny_mono_dir, max_slots=8, backend="torch", max_waiting=64))
        return engines[-1]
    app = create_app(factory, ServerSettings(api_key=KEY, max_audio_prompt_bytes=64 << 10, stream=STREAM))
    server = LiveServer(app)
    server.engine = engines[0]
    yield server
    server.stop()


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Parse a PCM16 WAV, accepting a streamed header's open-ended sizes (which the wave module refuses)."""
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    channels, rate = struct.unpack("<HI", data[22:28])
    assert data[36:40] == b"data"
    samples = np.frombuffer(data[44:], "<i2").reshape(-1, channels).T
    return samples, rate


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_whole_and_streamed_files_agree(live):
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=TIMEOUT) as client:
        assert client.get("/health").status_code == 200
        whole = client.post("/v1/audio/generate", json=GREEDY)
        assert whole.status_code == 200 and whole.headers["content-type"] == "audio/wav"
        with wave.open(io.BytesIO(whole.content)) as reader:  # a complete WAV the stdlib reads
            assert (reader.getnchannels(), reader.getframerate()) == (1, 32000)
        reference, _ = read_wav(whole.content)
        assert reference.shape == (1, 60 * 640)

        with client.stream("POST", "/v1/audio/generate", json={**GREEDY, "stream": True}) as response:
            assert response.status_code == 200 and response.headers.get("transfer-encoding") == "chunked"
            pieces = list(response.iter_bytes())
        streamed = b"".join(pieces)
        assert struct.unpack("<I", streamed[4:8])[0] == 0xFFFFFFFF and streamed[40:44] == b"\xff" * 4
        audio, rate = read_wav(streamed)
        assert rate == 32000 and audio.shape == reference.shape
        # the seam tolerance of tests/test_streaming.py (max error < 1e-3) plus int16 rounding
        assert np.abs(audio.astype(np.int32) - reference).max() <= 34

        pcm = client.post("/v1/audio/generate", json={**GREEDY, "stream": True, "response_format": "pcm"})
        assert pcm.headers["content-type"] == "audio/pcm" and pcm.content == streamed[44:]
        flac = client.post("/v1/audio/generate", json={**GREEDY, "response_format": "flac"})
        soundfile = pytest.importorskip("soundfile")
        decoded, _ = soundfile.read(io.BytesIO(flac.content), dtype="int16", always_2d=True)
        assert np.abs(decoded.T.astype(np.int32) - reference).max() <= 1  # soundfile scales by 32768, we by 32767


def test_concurrent_clients_some_disconnect(live):
    async def client_run(client, i):
        leaves = i % 4 == 3  # 8 of 32 hang up after their first bytes, long before their request ends
        body = {"prompt": f"client {i}", "duration": 6 if leaves else 0.8, "seed": i, "stream": True,
                "response_format": "pcm"}
        async with client.stream("POST", "/v1/audio/generate", json=body) as response:
            assert response.status_code == 200
            received = 0
            async for piece in response.aiter_bytes():
                received += len(piece)
                if leaves:
                    return None
            return received

    async def main():
        async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=TIMEOUT) as client:
            before = metric_values((await client.get("/metrics")).text)
            results = await asyncio.gather(*(client_run(client, i) for i in range(32)))
            deadline = time.monotonic() + 30
            while True:  # the aborts land within a step
                after = metric_values((await client.get("/metrics")).text)
                if after[("fastgen_running_slots", ())] == 0 and after[("fastgen_queue_depth", ())] == 0:
                    break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            return before, results, after

    before, results, after = asyncio.run(main())
    completed = [r for r in results if r is not None]
    assert len(completed) == 24 and all(r == 40 * 640 * 2 for r in completed)

    def delta(outcome):
        key = ("fastgen_requests_total", (("outcome", outcome),))
        return after[key] - before[key]
    assert delta("finished") == 24 and delta("disconnected") == 8
    engine = live.engine.engine
    deadline = time.monotonic() + 10
    while len(engine.scheduler.free_slots) != engine.num_slots:  # no slot leaked
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not engine.scheduler.waiting


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        t = np.arange(int(seconds * rate)) / rate
        writer.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())
    return buffer.getvalue()


def test_error_statuses_and_auth(live):
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=TIMEOUT) as client:
        before = metric_values(client.get("/metrics").text)
        post = lambda body, **kw: client.post("/v1/audio/generate", json=body, **kw)  # noqa: E731
        for body, field, words in [
            ({"duration": -1}, "duration", "positive"),
            ({"top_p": 2.0}, "top_p", "[0, 1]"),
            ({"guidance_scale": 1000}, "guidance_scale", "[0, 100]"),
            ({"seed": -3}, "seed", "2**63"),
            ({"duration": 400}, "duration", "over the limit of 300.00 s"),  # EngineConfig.max_duration_s
            ({"duration": 1, "stream": True, "response_format": "flac"}, "response_format", "cannot be streamed"),
            ({"response_format": "mp3"}, "response_format", "wav"),
            ({"temperature": "hot"}, "temperature", "number"),
            ({"nonsense": 1}, "nonsense", "Extra"),
            ({"audio_prompt": "***not base64***"}, "audio_prompt", "base64"),
            ({"audio_prompt": base64.b64encode(b"RIFF....WAVEjunk").decode()}, "audio_prompt", "WAV"),
        ]:
            response = post(body)
            assert response.status_code == 422, (body, response.text)
            detail = response.json()["detail"][0]
            if field is not None:
                assert detail["loc"][-1] == field, (body, detail)
            assert words in detail["msg"], (body, detail)
        assert post({"duration": 1}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(f"{live.url}/v1/audio/generate", json={"duration": 1}).status_code == 401
        ok = post({"duration": 0.2}, headers={"Authorization": "", "X-API-Key": KEY})
        assert ok.status_code == 200

        big = wav_bytes(4.0)  # 128 KB > the 64 KiB limit
        assert post({"duration": 0.2, "audio_prompt": base64.b64encode(big).decode()}).status_code == 413
        upload = client.post("/v1/audio/generate/upload", data={"params": '{"duration": 0.2}'},
                             files={"audio_prompt": ("big.wav", big, "audio/wav")})
        assert upload.status_code == 413
        small = wav_bytes(0.5)
        upload = client.post("/v1/audio/generate/upload", data={"params": '{"duration": 0.2, "seed": 1}'},
                             files={"audio_prompt": ("a.wav", small, "audio/wav")})
        assert upload.status_code == 200, upload.text
        continued, _ = read_wav(upload.content)
        assert continued.shape[-1] == (25 + 10) * 640  # the prompt's 25 frames, then 10 new ones
        inline = post({"duration": 0.2, "seed": 1, "audio_prompt": base64.b64encode(small).decode()})
        assert inline.content == upload.content
        bad = client.post("/v1/audio/generate/upload", data={"params": '{"top_k": "x"}'},
                          files={"audio_prompt": ("a.wav", small, "audio/wav")})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "top_k"

        schema = client.get("/openapi.json").json()
        fields = schema["components"]["schemas"]["GenerateBody"]["properties"]
        assert {"prompt", "duration", "max_new_tokens", "guidance_scale", "temperature", "top_k", "top_p",
                "do_sample", "seed", "response_format", "stream", "audio_prompt"} <= set(fields)
        after = metric_values(client.get("/metrics").text)

    def delta(outcome):
        key = ("fastgen_requests_total", (("outcome", outcome),))
        return after[key] - before[key]
    assert delta("invalid") == 12 and delta("unauthorized") == 2 and delta("too_large") == 2
    assert delta("finished") == 3


def test_queue_full_is_503_with_retry_after(tiny_mono_dir):
    def slow_engine():  # a step of ≥ 20 ms, as on a real model, so the long request outlasts the test's calls
        engine = AsyncEngine.from_pretrained(tiny_mono_dir, max_slots=1, backend="torch", max_waiting=1)
        engine.engine.listeners.append(lambda r, kind, p: time.sleep(0.02) if kind == "progress" else None)
        return engine
    app = create_app(slow_engine, ServerSettings(stream=STREAM))
    server = LiveServer(app)
    try:
        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
                long = {"duration": 10, "stream": True, "response_format": "pcm"}
                async with client.stream("POST", "/v1/audio/generate", json=long) as running:
                    pieces = running.aiter_bytes()  # (kept: a dropped iterator closes the response)
                    await pieces.__anext__()  # it holds the only slot now
                    waiting = asyncio.ensure_future(client.post("/v1/audio/generate", json={"duration": 0.2}))
                    for _ in range(200):  # the second one is queued once its request is submitted
                        values = metric_values((await client.get("/metrics")).text)
                        if values[("fastgen_queue_depth", ())] == 1:
                            break
                        await asyncio.sleep(0.02)
                    refused = await client.post("/v1/audio/generate", json={"duration": 0.2})
                # leaving the block disconnects the long one: the waiting request gets its slot
                return refused, await waiting, metric_values((await client.get("/metrics")).text)
        refused, waited, values = asyncio.run(main())
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "max_waiting=1" in refused.json()["detail"]
        assert waited.status_code == 200
        assert values[("fastgen_requests_total", (("outcome", "queue_full"),))] == 1
    finally:
        server.stop()


def test_metrics_add_up(live):
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=TIMEOUT) as client:
        before = metric_values(client.get("/metrics").text)
        for i, stream in enumerate([False, True, True]):
            assert client.post("/v1/audio/generate", json={"duration": 0.5, "seed": i, "stream": stream}
                               ).status_code == 200
        response = client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        after = metric_values(response.text)
    d = {key: after[key] - before.get(key, 0.0) for key in after}
    assert d[("fastgen_requests_total", (("outcome", "finished"),))] == 3
    assert d[("fastgen_audio_seconds_total", ())] == pytest.approx(1.5)
    assert d[("fastgen_time_to_first_audio_seconds_count", ())] == 3
    assert d[("fastgen_request_latency_seconds_count", ())] == 3
    assert d[("fastgen_request_latency_seconds_sum", ())] >= d[("fastgen_time_to_first_audio_seconds_sum", ())]
    assert after[("fastgen_running_slots", ())] == 0 and after[("fastgen_queue_depth", ())] == 0


def test_sigterm_finishes_in_flight_then_exits_zero(tiny_mono_dir):
    process, url = start_fastgen_serve(tiny_mono_dir, KEY)
    try:
        with httpx.Client(base_url=url, headers=AUTH, timeout=TIMEOUT) as client:
            body = {"duration": 10, "seed": 3, "stream": True, "response_format": "pcm"}
            with client.stream("POST", "/v1/audio/generate", json=body) as response:
                assert response.status_code == 200
                pieces = response.iter_bytes()
                received = len(next(pieces))
                process.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                with pytest.raises(httpx.TransportError):  # no longer accepting
                    httpx.get(f"{url}/health", timeout=2)
                received += sum(len(p) for p in pieces)
        assert received == 500 * 640 * 2  # the in-flight request finished in full
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_flags_reach_the_engine(tiny_mono_dir):
    """`fastgen serve --window --quantize --max-duration`: the options the recipe builds each replica's engine with."""
    import argparse

    from fastgen.serve.server import add_arguments, engine_factory
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_mono_dir), "--device", "cpu", "--window", "2", "--max-duration",
                              "5", "--quantize", "int8", "--max-slots", "1"])
    engine = engine_factory(args)()
    try:
        config = engine.engine.config
        assert (config.window_s, config.max_duration_s, config.quantization) == (2.0, 5.0, "int8")
        assert engine.engine.model.decoder.quantization == "int8"
    finally:
        engine.shutdown_sync()
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantize", "int3"])


def test_a_seeded_request_is_the_python_apis_audio(live, tiny_mono_dir):
    """Same seed, same music across entry points: the server's samples are the Python API's (PCM16 of them)."""
    from fastgen import MusicGen, SamplingParams
    from fastgen.serve.encoding import pcm16
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=TIMEOUT) as client:
        served = client.post("/v1/audio/generate", json={"prompt": "a tune", "duration": 0.8, "seed": 5,
                                                          "response_format": "pcm"})
    assert served.status_code == 200, served.text
    audio = MusicGen.from_pretrained(tiny_mono_dir, device="cpu").generate(
        ["a tune"], SamplingParams(duration=0.8, seed=5))[0].audio
    assert served.content == pcm16(audio)


def test_serve_threads_reach_the_engine_and_the_load_line_says_so(tiny_mono_dir):
    """`fastgen serve --threads N`: the engine's loop decodes with N intra-op threads, and once loaded the server
    logs the model, device, dtype, quantization, slots and threads (uvicorn's logger, shown at --log-level info)."""
    import argparse
    import logging

    import torch

    from fastgen import SamplingParams
    from fastgen.serve.server import add_arguments, engine_factory
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match="--threads must be a positive integer"):
        engine_factory(parser.parse_args(["--model", str(tiny_mono_dir), "--threads", "0"]))
    args = parser.parse_args(["--model", str(tiny_mono_dir), "--device", "cpu", "--max-slots", "2", "--threads", "2",
                              "--quantize", "int8"])
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        engine = engine_factory(args)()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    try:
        seen = []
        engine.engine.listeners.append(lambda request, kind, payload: seen.append(torch.get_num_threads()))
        engine.submit("a", SamplingParams(duration=0.1)).result(timeout=120)
        assert engine.cpu_threads == 2 and set(seen) == {2}
    finally:
        engine.shutdown_sync()
    (line,) = [r.getMessage() for r in records]
    assert line.startswith(f"fastgen: loaded {tiny_mono_dir} on cpu: dtype ")
    assert "quantization int8, 2 slot(s) of up to 300.00 s, 2 decode thread(s) (in " in line
