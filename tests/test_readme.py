"""The README's commands run as written, from the repository root, on the built-in tiny model.

A fenced block whose info string holds the word ``runnable`` is run, in the README's order, in a subprocess started
from the repository root (as a user runs it after the install commands, which CI runs itself):

- ```` ```bash runnable ````: run by ``bash -e -o pipefail``; it must exit 0;
- ```` ```bash runnable background ````: a server, started and left running for the blocks after it (each block
  waits for its ``/health``), then stopped with SIGTERM, which must end it with exit 0;
- ```` ```python runnable ````: run by this interpreter; it must exit 0.

Only the files a block writes move: the README's output names (``out/``, ``tiny-model``, ``jobs.jsonl``, ``*.wav``)
are rewritten to a temporary folder, and the server's port 8000 to a free one. Blocks without the marker (hub models,
GPUs, files the reader brings) are not run; the structure checks below hold for the whole README."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
BLOCK_TIMEOUT_S = 300
SERVER_START_S = 180
# the README's own output names, each made to point into the test's temporary folder
OUTPUT_NAMES = re.compile(r"(?<![\w./-])(out/|tiny-model\b|jobs\.jsonl\b|[\w-]+\.wav\b)")


def blocks(text: str) -> list[tuple[list[str], str]]:
    """(info string words, body) of every fenced block, in order."""
    return [(match.group(1).split(), match.group(2)) for match in BLOCK.finditer(text)]


def runnable_blocks(text: str) -> list[tuple[str, bool, str]]:
    """(language, background, body) of the blocks marked runnable."""
    return [(words[0], "background" in words, body) for words, body in blocks(text) if "runnable" in words[1:]]


def localise(body: str, folder: pathlib.Path, port: int) -> str:
    body = OUTPUT_NAMES.sub(lambda match: f"{folder}/{match.group(1)}", body)
    return re.sub(r"\b8000\b", str(port), body)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def user_env() -> dict[str, str]:
    """The environment a user's shell has: the test run's Python (and its console scripts) first on PATH, none of
    the suite's own settings."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def missing_tool(language: str, body: str) -> str | None:
    """Why a block cannot run on this machine (a tool or package the README asks the reader to have), or None."""
    if language == "bash" and re.search(r"(^|[|;&]\s*)curl\b", body, re.M) and shutil.which("curl") is None:
        return "curl is not installed"
    if language == "python" and "from openai import" in body:
        import importlib.util
        if importlib.util.find_spec("openai") is None:
            return "the openai package is not installed"
    return None


def wait_for_health(port: int, server: subprocess.Popen, log: pathlib.Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the README's server exited {server.returncode} before answering:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the README's server did not answer /health in {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen, log: pathlib.Path) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            pytest.fail(f"the README's server ignored SIGTERM for 60 s:\n{log.read_text()[-3000:]}")
    assert server.returncode == 0, f"the README's server exited {server.returncode}:\n{log.read_text()[-3000:]}"


@pytest.mark.slow
def test_the_readmes_runnable_blocks_run_as_written(tmp_path):
    todo = runnable_blocks(README.read_text())
    assert any(language == "python" for language, _, _ in todo), "no runnable Python example in the README"
    port, env = free_port(), user_env()
    names_before = {path.name for path in REPO.iterdir()}
    servers: list[tuple[subprocess.Popen, pathlib.Path]] = []
    skipped: list[str] = []
    try:
        for index, (language, background, body) in enumerate(todo):
            reason = missing_tool(language, body)
            if reason:
                skipped.append(f"block {index}: {reason}")
                continue
            script = localise(body, tmp_path, port)
            command = ["bash", "-e", "-o", "pipefail", "-c", script] if language == "bash" \
                else [sys.executable, "-c", script]
            assert language in ("bash", "python"), f"block {index}: cannot run a {language!r} block"
            if background:
                log = tmp_path / f"server-{index}.log"
                with log.open("w") as sink:
                    servers.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=sink,
                                                     stderr=subprocess.STDOUT, start_new_session=True), log))
                wait_for_health(port, *servers[-1])
                continue
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=BLOCK_TIMEOUT_S)
            assert done.returncode == 0, (f"README block {index} exited {done.returncode}:\n{body}\n"
                                          f"--- stdout\n{done.stdout[-2000:]}\n--- stderr\n{done.stderr[-3000:]}")
    finally:
        for server, log in servers:
            stop(server, log)
    assert (tmp_path / "out").is_dir(), "no runnable block wrote to out/"
    written = {path.name for path in REPO.iterdir()} - names_before
    assert not {name for name in written if OUTPUT_NAMES.fullmatch(name) or name == "out"}, \
        f"a README block wrote into the checkout: {written}"
    if skipped:
        pytest.skip("; ".join(skipped))


def test_the_readme_is_short_with_regular_headings_and_working_links():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the reference belongs in docs/"
    outside = BLOCK.sub("", text)
    levels = [len(match.group(1)) for match in re.finditer(r"^(#+) ", outside, re.M)]
    assert levels[0] == 1 and levels.count(1) == 1, "one title, first"
    assert all(b <= a + 1 for a, b in zip(levels, levels[1:])), f"a heading skips a level: {levels}"
    for link in re.findall(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)", outside):
        if not link.startswith(("http://", "https://")):
            assert (REPO / link).exists(), f"README links to {link}, which does not exist"


def test_the_readme_speaks_to_users():
    """What the project does, not how it is worked on; and installs that name this checkout, not PyPI's unrelated
    project called fastgen."""
    text = README.read_text()
    for pattern in (r"\bsessions?\b", r"\bissue \d+", r"#\d+\b", r"\blent\b", r"house style",
                    r"pip install [\"']?fastgen\b"):
        assert not re.search(pattern, text, re.I), f"README.md says {re.search(pattern, text, re.I).group(0)!r}"


def test_the_markers_are_found():
    sample = "```bash runnable\necho 1\n```\n\n```bash\necho 2\n```\n\n```bash runnable background\nserve\n```\n" \
             "```python runnable\nprint(1)\n```\n"
    assert runnable_blocks(sample) == [("bash", False, "echo 1\n"), ("bash", True, "serve\n"),
                                       ("python", False, "print(1)\n")]
    moved = localise('fastgen generate x --out out/ --model tiny-model; curl localhost:8000 -o beat.wav\n'
                     'open("pop.wav"); cat jobs.jsonl; ls out/jobs/', pathlib.Path("/t"), 1234)
    assert moved == ('fastgen generate x --out /t/out/ --model /t/tiny-model; curl localhost:1234 -o /t/beat.wav\n'
                     'open("/t/pop.wav"); cat /t/jobs.jsonl; ls /t/out/jobs/')
