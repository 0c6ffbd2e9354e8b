"""Shared by the HTTP tests: uvicorn in this process on a loopback socket, and `fastgen serve` as a user starts it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import uvicorn


class LiveServer:
    """uvicorn serving ``app`` on a loopback socket in a background thread."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def start_fastgen_serve(folder, api_key: str) -> tuple[subprocess.Popen, str]:
    """`python -m fastgen.cli serve` on a free loopback port (2 slots, 60 s grace), once /health answers: the process
    and its URL. The caller stops it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "FASTGEN_API_KEY": api_key}
    process = subprocess.Popen([sys.executable, "-m", "fastgen.cli", "serve", "--model", str(folder),
                                "--port", str(port), "--backend", "torch", "--max-slots", "2", "--grace-s", "60",
                                "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise AssertionError(process.stderr.read())
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("server did not become healthy")
        time.sleep(0.2)
