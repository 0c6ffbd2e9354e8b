"""Ray Serve: the app as a deployment on a local cluster (one replica, half a CPU), whole and streamed responses
through Serve's HTTP proxy on 127.0.0.1."""
from __future__ import annotations

import random
import socket
import struct
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from fastgen import StreamConfig  # noqa: E402
from fastgen.serve.app import ServerSettings  # noqa: E402
from fastgen.serve.ray_serve import deployment  # noqa: E402
from fastgen.serve.server import EngineRecipe  # noqa: E402

pytestmark = pytest.mark.slow  # see pyproject's markers: the quick tier leaves it out


def quiet_port() -> int:
    """A free port that Ray's own processes will not take between this probe and the proxy's bind: outside its
    worker-port range (10002-19999) and the kernel's ephemeral range (from 32768) that its gRPC servers draw from.
    (Port 0's answer lies in the ephemeral range: a raylet once took it first and the proxy failed to bind.)"""
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in 20000-31999")


def test_ray_serve_replica_streams_through_the_proxy(tiny_mono_dir):
    port = quiet_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        recipe = EngineRecipe(str(tiny_mono_dir), "cpu", None, {"backend": "torch", "max_slots": 4})
        settings = ServerSettings(stream=StreamConfig(first_chunk_s=0.1, interval_s=0.3))
        serve.run(deployment(recipe, settings, replicas=1, max_ongoing_requests=8, num_cpus=0.5),
                  name="fastgen", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=120) as client:
            deadline = time.monotonic() + 120
            while client.get("/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            body = {"prompt": "ray", "duration": 1.0, "do_sample": False}
            whole = client.post("/v1/audio/generate", json={**body, "response_format": "pcm"})
            assert whole.status_code == 200 and len(whole.content) == 50 * 640 * 2
            with client.stream("POST", "/v1/audio/generate", json={**body, "stream": True}) as response:
                assert response.status_code == 200
                pieces = [p for p in response.iter_bytes() if p]
            assert len(pieces) >= 3  # chunked through the proxy, not buffered into one body
            streamed = b"".join(pieces)
            assert struct.unpack("<I", streamed[40:44])[0] == 0xFFFFFFFF
            diff = np.frombuffer(streamed[44:], "<i2").astype(np.int32) - np.frombuffer(whole.content, "<i2")
            assert np.abs(diff).max() <= 34  # the seam tolerance (tests/test_serve.py)
            assert client.post("/v1/audio/generate", json={"duration": -1}).status_code == 422
            assert "fastgen_requests_total" in client.get("/metrics").text
    finally:
        serve.shutdown()
        ray.shutdown()
