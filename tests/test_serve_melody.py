"""A melody over HTTP: the `melody` field of POST /v1/audio/generate (base64) and the `melody` part of its upload twin
give the Python API's audio for the same melody; a melody on a text-only checkpoint, bad base64 and an oversize file
get 422 / 413 naming the field."""
from __future__ import annotations

import base64
import io
import json
import wave

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from melody_reference import melodies  # noqa: E402

import fastgen  # noqa: E402
from fastgen.serve import encoding  # noqa: E402
from fastgen.serve.app import ServerSettings, create_app  # noqa: E402
from serve_checks import LiveServer  # noqa: E402

BODY = {"prompt": "a tune", "duration": 0.6, "do_sample": False, "guidance_scale": 3.0}
LIMIT = 256 << 10
TIMEOUT = httpx.Timeout(120.0)


def start_server(folder) -> LiveServer:
    """An AsyncEngine of ``folder`` served on a loopback socket."""
    factory = lambda: fastgen.AsyncEngine.from_pretrained(folder, max_slots=2, backend="torch")  # noqa: E731
    return LiveServer(create_app(factory, ServerSettings(max_audio_prompt_bytes=LIMIT)))


def wav_bytes(audio: np.ndarray, rate: int = 32000) -> bytes:
    audio = np.atleast_2d(audio)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(audio.shape[0])
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").T.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def melody_server(tiny_melody_mono_dir):
    server = start_server(tiny_melody_mono_dir)
    yield server
    server.stop()


def test_melody_field_and_upload_part_give_the_python_api_audio(melody_server, tiny_melody_mono_dir):
    tune = wav_bytes(melodies()["short"])
    with httpx.Client(base_url=melody_server.url, timeout=TIMEOUT) as client:
        whole = client.post("/v1/audio/generate", json={**BODY, "melody": base64.b64encode(tune).decode()})
        upload = client.post("/v1/audio/generate/upload", data={"params": json.dumps(BODY)},
                             files={"melody": ("tune.wav", tune, "audio/wav")})
        plain = client.post("/v1/audio/generate", json=BODY)
    for response in (whole, upload, plain):
        assert response.status_code == 200, response.text
    assert whole.content == upload.content
    assert whole.content != plain.content  # the melody matters
    model = fastgen.MusicGen.from_pretrained(tiny_melody_mono_dir, max_slots=1, backend="torch")
    params = fastgen.SamplingParams(duration=0.6, do_sample=False, guidance_scale=3.0)
    expected = model.generate(["a tune"], params, melodies=[encoding.decode_upload(tune, "melody")])[0]
    assert whole.content == encoding.encode_whole(expected.audio, expected.sample_rate, "wav")


def test_bad_melodies_are_refused_naming_the_field(melody_server, tiny_mono_dir):
    with httpx.Client(base_url=melody_server.url, timeout=TIMEOUT) as client:
        bad = client.post("/v1/audio/generate", json={**BODY, "melody": "not base64!"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "melody"]
        big = client.post("/v1/audio/generate/upload", data={"params": json.dumps(BODY)},
                          files={"melody": ("big.wav", b"\0" * (LIMIT + 1), "audio/wav")})
        assert big.status_code == 413 and "melody" in big.json()["detail"]
        unreadable = client.post("/v1/audio/generate/upload", data={"params": json.dumps(BODY)},
                                 files={"melody": ("x.wav", b"RIFF....WAVEjunk", "audio/wav")})
        assert unreadable.status_code == 422 and "melody" in unreadable.text
        nothing = client.post("/v1/audio/generate/upload", data={"params": json.dumps(BODY)})
        assert nothing.status_code == 422
    text_server = start_server(tiny_mono_dir)
    try:
        with httpx.Client(base_url=text_server.url, timeout=TIMEOUT) as client:
            tune = base64.b64encode(wav_bytes(melodies()["short"])).decode()
            refused = client.post("/v1/audio/generate", json={**BODY, "melody": tune})
        assert refused.status_code == 422, refused.text
        detail = refused.json()["detail"][0]
        assert detail["loc"] == ["body", "melody"] and "MusicGen-Melody checkpoint" in detail["msg"]
    finally:
        text_server.stop()
