"""OpenAI's speech API on a real server, through the official ``openai`` SDK: the whole WAV, a streamed response, SSE
events whose audio is the stream's and (for a whole-file format) the whole file's to the byte, errors as the SDK's
typed exceptions, the seed returned; vllm-omni's field names on /v1/audio/generate; and once through a real
``python -m fastgen.cli serve`` subprocess, as a user starts it, with SIGTERM during an SSE stream."""
from __future__ import annotations

import base64
import io
import json
import signal
import time
import wave

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serve_checks import LiveServer, start_fastgen_serve  # noqa: E402
from test_serve import metric_values  # noqa: E402

from fastgen import AsyncEngine, StreamConfig  # noqa: E402
from fastgen.serve.app import ServerSettings, create_app  # noqa: E402

KEY = "sdk-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STREAM = StreamConfig(first_chunk_s=0.1, interval_s=0.3)
SAMPLES_PER_SECOND = 32000  # the tiny model's rate; 1 s = 50 frames of 640 samples


@pytest.fixture(scope="module")
def live(tiny_mono_dir):
    engines = []

    def factory():
        engines.append(AsyncEngine.from_pretrained(tiny_mono_dir, max_slots=4, backend="torch"))
        return engines[-1]
    server = LiveServer(create_app(factory, ServerSettings(api_key=KEY, stream=STREAM, model_name="tiny-musicgen")))
    server.engine = engines[0]
    yield server
    server.stop()


def sdk(url: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def speech(client, **kw):
    """client.audio.speech.create with the SDK's required fields filled in; fastgen's own fields as extra_body."""
    own = {k: kw.pop(k) for k in ("duration", "seed", "guidance_scale", "temperature", "top_k", "top_p", "do_sample")
           if k in kw}
    return client.audio.speech.create(**{"model": "tiny-musicgen", "voice": "alloy", "input": "a tune", **kw},
                                      extra_body=own)


def sse_events(lines) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]


def test_sdk_whole_wav_models_and_seed(live):
    client = sdk(live.url)
    assert [m.id for m in client.models.list().data] == ["tiny-musicgen"]

    answer = speech(client, response_format="wav", duration=1, seed=7)
    assert answer.response.headers["content-type"] == "audio/wav" and answer.response.headers["x-seed"] == "7"
    with wave.open(io.BytesIO(answer.content)) as reader:  # a complete WAV the stdlib reads
        assert (reader.getnchannels(), reader.getframerate(), reader.getnframes()) == (1, 32000, SAMPLES_PER_SECOND)
    # the same request as fastgen's own route gives the same file; instructions are joined to the description
    own = httpx.post(f"{live.url}/v1/audio/generate", headers=AUTH, timeout=120,
                     json={"prompt": "a tune", "duration": 1, "seed": 7})
    assert own.content == answer.content
    joined = speech(client, instructions="slow, with rain", response_format="pcm", duration=0.5, seed=2)
    own = httpx.post(f"{live.url}/v1/audio/generate", headers=AUTH, timeout=120,
                     json={"prompt": "a tune. slow, with rain", "duration": 0.5, "seed": 2, "response_format": "pcm"})
    assert joined.content == own.content

    drawn = speech(client, response_format="pcm", duration=0.5)  # no seed: one drawn, returned, JS-exact
    seed = int(drawn.response.headers["x-seed"])
    assert 0 <= seed < 2**53
    assert speech(client, response_format="pcm", duration=0.5, seed=seed).content == drawn.content

    soundfile = pytest.importorskip("soundfile")
    for response_format in ("flac", "mp3"):
        try:
            encoded = speech(client, response_format=response_format, duration=0.5, seed=7)
        except openai.UnprocessableEntityError as exc:  # a libsndfile without MP3: the 422 names what works
            assert response_format == "mp3" and "supported here: wav, flac, pcm" in exc.message
            continue
        audio, rate = soundfile.read(io.BytesIO(encoded.content), always_2d=True)
        assert rate == 32000 and abs(audio.shape[0] - SAMPLES_PER_SECOND // 2) < 2000  # mp3 pads its frames


def test_sdk_streamed_response_and_sse(live):
    client = sdk(live.url)
    body = dict(model="tiny-musicgen", voice="alloy", input="a tune", extra_body={"duration": 1, "seed": 3})
    with client.audio.speech.with_streaming_response.create(response_format="pcm", stream_format="audio",
                                                            **body) as response:
        assert response.headers.get("transfer-encoding") == "chunked" and response.headers["x-seed"] == "3"
        pieces = list(response.iter_bytes())
    streamed = b"".join(pieces)
    assert len(streamed) == SAMPLES_PER_SECOND * 2

    with client.audio.speech.with_streaming_response.create(response_format="pcm", stream_format="sse",
                                                            **body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    *deltas, done = events
    assert len(deltas) >= 2 and all(e["type"] == "speech.audio.delta" for e in deltas)  # chunks as generated
    assert b"".join(base64.b64decode(e["audio"]) for e in deltas) == streamed
    assert done["type"] == "speech.audio.done" and done["seed"] == "3"
    usage = done["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] == 50 * 4  # 50 frames × 4 codebooks
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

    # against the whole file of the same seed: a streamed clip is decoded in windows, so equal within the seams'
    # tolerance (tests/test_serve.py's); a whole-file format sent over SSE is that file, byte for byte
    whole = speech(client, response_format="pcm", duration=1, seed=3).content
    difference = np.frombuffer(streamed, "<i2").astype(np.int32) - np.frombuffer(whole, "<i2")
    assert len(streamed) == len(whole) and np.abs(difference).max() <= 34
    with client.audio.speech.with_streaming_response.create(response_format="wav", stream_format="sse",
                                                            **body) as response:
        events = sse_events(response.iter_lines())
    wav = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert wav[4:8] == b"\xff" * 4 and wav[44:] == streamed  # the open-ended header, then the stream's samples
    if _can_encode("flac"):
        flac = speech(client, response_format="flac", duration=1, seed=3).content
        with client.audio.speech.with_streaming_response.create(response_format="flac", stream_format="sse",
                                                                **body) as response:
            events = sse_events(response.iter_lines())
        assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == flac
        assert events[-1]["type"] == "speech.audio.done" and events[-1]["seed"] == "3"


def _can_encode(response_format: str) -> bool:
    from fastgen.serve.encoding import can_encode
    return can_encode(response_format)


def test_sdk_errors_are_typed_exceptions(live):
    client = sdk(live.url)
    before = metric_values(httpx.get(f"{live.url}/metrics").text)
    with pytest.raises(openai.AuthenticationError) as caught:
        speech(sdk(live.url, key="wrong"), duration=0.5)
    assert caught.value.status_code == 401 and "API key" in caught.value.message
    with pytest.raises(openai.AuthenticationError):
        sdk(live.url, key="wrong").models.list()
    for kw, param, words in [
        ({"speed": 1.5}, "speed", "speed must be 1.0"),
        ({"response_format": "aac"}, "response_format", "supported here: wav, flac, pcm"),
        ({"duration": -1}, "duration", "positive"),
        ({"seed": -3}, "seed", "2**63"),
        ({"top_p": 2.0}, "top_p", "[0, 1]"),
        ({"duration": 400}, "duration", "over the limit"),
        ({"stream_format": "chunks"}, "stream_format", "'audio' or 'sse'"),
    ]:
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            speech(client, **kw)
        error = caught.value
        assert (error.status_code, error.param, error.type) == (422, param, "invalid_request_error"), kw
        assert words in error.message, (kw, error.message)
    # the wire shape, for clients other than the SDK; an unknown key is refused, not silently dropped
    raw = httpx.post(f"{live.url}/v1/audio/speech", headers=AUTH, json={"input": "a", "duraton": 1})
    assert raw.status_code == 422 and set(raw.json()) == {"error"}
    assert raw.json()["error"] == {"message": "duraton: Extra inputs are not permitted",
                                   "type": "invalid_request_error", "param": "duraton", "code": "invalid_value"}
    missing = httpx.post(f"{live.url}/v1/audio/speech", headers=AUTH, json={"voice": "alloy"}).json()["error"]
    assert missing["param"] == "input" and "Field required" in missing["message"]
    unauthorized = httpx.post(f"{live.url}/v1/audio/speech", json={"input": "a"})
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "invalid_api_key"
    after = metric_values(httpx.get(f"{live.url}/metrics").text)

    def delta(outcome):
        key = ("fastgen_requests_total", (("outcome", outcome),))
        return after[key] - before[key]
    assert delta("invalid") == 9 and delta("unauthorized") == 3 and delta("finished") == 0


def test_a_client_leaving_an_sse_stream_aborts_its_request(live):
    async_body = {"model": "m", "voice": "v", "input": "long", "duration": 60, "stream_format": "sse",
                  "response_format": "pcm"}
    before = metric_values(httpx.get(f"{live.url}/metrics").text)
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=120) as client:
        with client.stream("POST", "/v1/audio/speech", json=async_body) as response:
            assert response.status_code == 200
            first = next(response.iter_lines())
            assert json.loads(first[len("data: "):])["type"] == "speech.audio.delta"
    deadline = time.monotonic() + 30
    while True:
        after = metric_values(httpx.get(f"{live.url}/metrics").text)
        if after[("fastgen_running_slots", ())] == 0 and after[("fastgen_queue_depth", ())] == 0:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    key = ("fastgen_requests_total", (("outcome", "disconnected"),))
    assert after[key] - before[key] == 1


def test_vllm_omni_field_names_on_generate(live):
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=120) as client:
        own = client.post("/v1/audio/generate", json={"prompt": "a tune", "duration": 0.5, "seed": 4,
                                                      "response_format": "pcm"})
        named = client.post("/v1/audio/generate", json={"input": "a tune", "audio_length": 0.5, "seed": 4,
                                                        "response_format": "pcm", "negative_prompt": ""})
        assert own.status_code == named.status_code == 200 and named.content == own.content
        for body, field, words in [
            ({"input": "a", "prompt": "b"}, "input", "give one of the two"),
            ({"audio_length": 1, "duration": 1}, "audio_length", "give one of the two"),
            ({"negative_prompt": "drums"}, "negative_prompt", "not supported"),
        ]:
            response = client.post("/v1/audio/generate", json=body)
            detail = response.json()["detail"][0]
            assert response.status_code == 422 and detail["loc"][-1] == field and words in detail["msg"], body


@pytest.mark.slow
def test_sdk_against_fastgen_serve_and_sigterm_during_sse(tiny_mono_dir):
    """`python -m fastgen.cli serve` as a user starts it: the SDK's whole WAV, /v1/models naming the --model given,
    and SIGTERM in the middle of an SSE stream: the stream ends with its done event, the process exits 0."""
    process, url = start_fastgen_serve(tiny_mono_dir, KEY)
    try:
        client = sdk(url)
        assert [m.id for m in client.models.list().data] == [str(tiny_mono_dir)]
        answer = speech(client, response_format="wav", duration=0.5, seed=11)
        with wave.open(io.BytesIO(answer.content)) as reader:
            assert reader.getnframes() == SAMPLES_PER_SECOND // 2
        with client.audio.speech.with_streaming_response.create(
                model="m", voice="alloy", input="a tune", response_format="pcm", stream_format="sse",
                extra_body={"duration": 8, "seed": 11}) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)
            events = [json.loads(first[6:])] + sse_events(lines)
        audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
        assert events[-1]["type"] == "speech.audio.done" and len(audio) == 8 * SAMPLES_PER_SECOND * 2
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
