"""The web page at ``GET /``, driven in a real headless browser: Debian's ``chromium`` over the DevTools protocol
(a websocket; no driver binary, nothing downloaded at run time), against a real server on 127.0.0.1 that wants a
key. Keyboard only (Tab, typing, Enter), it shows the server's 401 words, then generates a 1 s clip that plays while
it streams and ends in a playable ``<audio>`` whose WAV is the API's audio for the seed, a seed past 2**53 carried
exactly. Skipped, saying why, where no chromium is installed (CI installs it in .ci/run)."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
sync_client = pytest.importorskip("websockets.sync.client")

from serve_checks import LiveServer  # noqa: E402

from fastgen import AsyncEngine  # noqa: E402
from fastgen.serve.app import ServerSettings, create_app  # noqa: E402

KEY = "page-key"
BIG_SEED = str(2**53 + 1)  # a JavaScript number would round it to 2**53


def browser_binary() -> str | None:
    for name in (os.environ.get("FASTGEN_TEST_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Browser:
    """Headless chromium and one page, spoken to over the DevTools protocol."""

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="fastgen-chromium-")
        self.process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--mute-audio", "--autoplay-policy=no-user-gesture-required", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = pathlib.Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            assert self.process.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = port_file.read_text().splitlines()[0]
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(sync_client.connect(page["webSocketDebuggerUrl"], max_size=None,
                                                               open_timeout=30))
        self.next_id = 0
        self.exceptions: list[str] = []
        self.call("Runtime.enable")
        self.call("Page.enable")

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=120))
            if message.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(json.dumps(message["params"]["exceptionDetails"])[:2000])
            if message.get("id") == self.next_id:
                assert "error" not in message, (method, message["error"])
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, (expression, result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}: page state " + \
                str(self.js("JSON.stringify([window.fastgenPage, document.getElementById('status').textContent, "
                            "document.getElementById('error').textContent])"))
            time.sleep(0.1)
        return value

    def key(self, key: str, code: int, modifiers: int = 0, commands: list[str] | None = None) -> None:
        """A real (trusted) key press: keyDown (with its text for Enter) and keyUp."""
        down = {"type": "keyDown", "key": key, "code": key, "windowsVirtualKeyCode": code, "modifiers": modifiers}
        if key == "Enter":
            down["text"] = "\r"
        if commands:
            down["commands"] = commands
        self.call("Input.dispatchKeyEvent", **down)
        self.call("Input.dispatchKeyEvent", type="keyUp", key=key, code=key, windowsVirtualKeyCode=code,
                  modifiers=modifiers)

    def tab_to(self, element_id: str, presses: int = 30) -> None:
        for _ in range(presses):
            self.key("Tab", 9)
            if self.js("document.activeElement && document.activeElement.id") == element_id:
                return
        raise AssertionError(f"Tab never reached #{element_id}")

    def type(self, text: str, replace: bool = True) -> None:
        if replace:
            self.key("a", 65, modifiers=2, commands=["selectAll"])
        self.call("Input.insertText", text=text)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stack.close()
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    binary = browser_binary()
    if binary is None:
        pytest.skip("no chromium installed: the page test needs a headless browser (apt-get install chromium; "
                    ".ci/run installs it)")
    browser = Browser(binary)
    yield browser
    browser.close()


def test_the_page_generates_streams_and_plays_a_clip(browser, tiny_mono_dir):
    app = create_app(lambda: AsyncEngine.from_pretrained(tiny_mono_dir, max_slots=2, backend="torch"),
                     ServerSettings(api_key=KEY))
    server = LiveServer(app)
    try:
        page = httpx.get(f"{server.url}/", timeout=10)  # no key needed for the page itself
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        browser.call("Page.navigate", url=f"{server.url}/")
        browser.wait_for("document.readyState === 'complete' && window.fastgenPage !== undefined")

        # keyboard only: Tab to each field, type, Enter submits the form
        browser.tab_to("prompt")
        browser.type("a short tune", replace=False)
        browser.tab_to("duration")
        browser.type("1")
        browser.tab_to("seed")
        browser.type(BIG_SEED)
        browser.key("Enter", 13)
        browser.wait_for("window.fastgenPage.state === 'error'")
        assert browser.js("document.getElementById('error').textContent") == \
            "a valid API key is required (Authorization: Bearer KEY or X-API-Key)"

        browser.tab_to("key")
        browser.type(KEY)
        started = time.monotonic()
        browser.key("Enter", 13)
        browser.wait_for("window.fastgenPage.state === 'done'")
        elapsed = time.monotonic() - started
        assert browser.js("document.getElementById('error').hidden")
        assert browser.js("window.fastgenPage.liveChunks") >= 1  # Web Audio played chunks as they came
        assert browser.js("document.getElementById('seed-used').textContent") == BIG_SEED
        assert browser.js("document.getElementById('download').download") == f"fastgen-{BIG_SEED}.wav"
        assert browser.js("document.getElementById('download').href").startswith("blob:")

        # a playable <audio>: loaded, 1 s long, and it plays
        browser.wait_for("document.getElementById('player').readyState >= 4", timeout=30)
        assert browser.js("document.getElementById('player').duration") == pytest.approx(1.0, abs=1e-3)
        browser.js("document.getElementById('player').play()")
        browser.wait_for("document.getElementById('player').currentTime > 0.05", timeout=30)
        assert not browser.js("document.getElementById('player').error")

        # the clip is the API's audio for that seed, to the byte
        clip = base64.b64decode(browser.js(
            "fetch(document.getElementById('player').src).then(r => r.arrayBuffer()).then(b => {"
            " let s = ''; new Uint8Array(b).forEach(x => s += String.fromCharCode(x)); return btoa(s); })"))
        api = httpx.post(f"{server.url}/v1/audio/speech", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                         json={"model": "m", "voice": "v", "input": "a short tune", "duration": 1, "seed": BIG_SEED,
                               "response_format": "pcm", "stream_format": "audio"})
        assert api.status_code == 200 and api.headers["x-seed"] == BIG_SEED
        assert clip[:4] == b"RIFF" and clip[44:] == api.content and len(api.content) == 32000 * 2

        # "use this seed again" puts the exact string back; a bad value gets the server's own words
        browser.js("document.getElementById('seed').value = ''")
        browser.tab_to("reuse")
        browser.key("Enter", 13)
        assert browser.js("document.getElementById('seed').value") == BIG_SEED
        browser.type("abc")
        browser.key("Enter", 13)
        browser.wait_for("window.fastgenPage.state === 'error'")
        assert browser.js("document.getElementById('error').textContent") == \
            "seed: Input should be a valid integer, unable to parse string as an integer"
        assert not browser.exceptions, browser.exceptions
        print(f"page: a 1 s clip generated, streamed and loaded in {elapsed:.1f} s")
    finally:
        server.stop()


def test_the_page_without_a_key_and_stopping_a_stream(browser, tiny_mono_dir):
    """A server without a key: the empty key field sends none. Escape stops a long stream; the server aborts the
    request (counted as disconnected, its slot free)."""
    app = create_app(lambda: AsyncEngine.from_pretrained(tiny_mono_dir, max_slots=2, backend="torch"),
                     ServerSettings())
    server = LiveServer(app)
    try:
        browser.call("Page.navigate", url=f"{server.url}/")
        browser.wait_for("document.readyState === 'complete' && window.fastgenPage !== undefined")
        browser.js("document.getElementById('duration').value = '0.5'")
        browser.tab_to("generate")
        browser.key("Enter", 13)
        browser.wait_for("window.fastgenPage.state === 'done'")
        assert browser.js("document.getElementById('player').src").startswith("blob:")

        browser.js("document.getElementById('duration').value = '120'")
        browser.tab_to("generate")
        browser.key("Enter", 13)
        browser.wait_for("window.fastgenPage.state === 'streaming'")
        browser.key("Escape", 27)
        browser.wait_for("window.fastgenPage.state === 'stopped'")
        deadline = time.monotonic() + 30
        while True:  # the server saw the client leave and aborted the request
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
            if 'fastgen_requests_total{outcome="disconnected"} 1.0' in metrics and \
                    "fastgen_running_slots 0.0" in metrics:
                break
            assert time.monotonic() < deadline, metrics
            time.sleep(0.1)
        assert not browser.exceptions, browser.exceptions
    finally:
        server.stop()


def test_the_page_is_one_offline_file():
    """No external assets: nothing the page loads comes from another host."""
    from importlib import resources
    html = resources.files("fastgen.serve").joinpath("static/index.html").read_text()
    for marker in ("src=\"http", "href=\"http", "src=\"//", "href=\"//", "@import", "url(http"):
        assert marker not in html
