"""The request path the HTTP routes share (fastgen.serve.app's own and OpenAI's in fastgen.serve.openai_routes): the
server state around the AsyncEngine (start-up, auth, metrics, refusals), accepting a request, answering with a whole
file or a stream, aborting on disconnect, and the body-size guard."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from fastgen import AsyncEngine, FastgenError, QueueFull, RequestAborted, RequestError, RequestFailed, SamplingParams
from fastgen.engine.streaming import StreamConfig
from fastgen.serve import encoding
from fastgen.serve.bodies import GenerateBody, field_of
from fastgen.serve.metrics import ServerMetrics

PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


@dataclass(frozen=True, slots=True)
class ServerSettings:
    api_key: str | None = None                 # None: no authentication
    max_audio_prompt_bytes: int = 16 << 20     # an uploaded / base64 audio prompt's file size; larger → 413
    retry_after_s: int = 1                     # the Retry-After of a 503 when the queue is full
    stream: StreamConfig = StreamConfig()
    disconnect_poll_s: float = 0.1             # how often a whole-file request checks that its client is there
    model_name: str | None = None              # GET /v1/models' id; None: the recipe's model, else "musicgen"

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None")
        if self.max_audio_prompt_bytes < 1:
            raise ValueError(f"max_audio_prompt_bytes must be ≥ 1, got {self.max_audio_prompt_bytes}")


class _Disconnected(Exception):
    pass


class Refused(Exception):
    """A request answered with an error status; each route words it in its API's error shape. ``status`` 499: the
    client left (nobody reads the answer)."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass(slots=True)
class Begun:
    """An accepted request whose first event is in: its output (whole file), or its first audio chunk (streamed)."""
    handle: Any
    events: AsyncIterator[Any]
    first: Any
    accepted: float


async def _decoded(data: bytes | None, name: str) -> tuple[np.ndarray, int] | None:
    """An uploaded audio file (audio prompt or melody) → (float32 [channels, samples], rate), off the event loop."""
    if data is None:
        return None
    try:
        return await run_in_threadpool(encoding.decode_upload, data, name)
    except RequestError:
        raise
    except Exception as exc:  # whatever a malformed file makes a decoder raise is the client's error
        raise RequestError(f"{name}: not a readable audio file ({type(exc).__name__}: {exc})") from None


def error_json(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    detail = [{"loc": ["body", field] if field else ["body"], "msg": message, "type": "value_error"}]
    return JSONResponse({"detail": detail if status == 422 else message}, status, headers=headers)


def _refused_response(exc: Refused) -> Response:
    """/v1/audio/generate's shape: 422 as FastAPI's detail list naming the field, others {"detail": message}."""
    if exc.status == 499:
        return Response(status_code=499)
    field = field_of(exc.message, GenerateBody.model_fields) if exc.status == 422 else None
    return error_json(exc.status, exc.message, field, exc.headers)


class ServerState:
    def __init__(self, engine_factory: Callable[[], AsyncEngine], settings: ServerSettings) -> None:
        self.engine_factory = engine_factory
        self.settings = settings
        self.metrics = ServerMetrics()
        self.engine: AsyncEngine | None = None
        self.ready = False

    async def start(self) -> None:
        self.engine = await run_in_threadpool(self.engine_factory)
        # one short streamed request: the first real one then pays no first-call costs
        warm = self.engine.submit(None, SamplingParams(duration=0.2, do_sample=False, guidance_scale=1.0))
        async for _ in warm.stream_audio(StreamConfig(first_chunk_s=0.02, interval_s=0.02)):
            pass
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self.engine is not None:
            await self.engine.shutdown()

    def authorized(self, request: Request) -> bool:
        key = self.settings.api_key
        if key is None:
            return True
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), key.encode())

    def require_key(self, request: Request) -> None:
        """A dependency of the generation routes: it runs before the body is validated, so a client without the key
        learns nothing about the API but the 401."""
        if not self.authorized(request):
            self.metrics.requests.labels("unauthorized").inc()
            raise HTTPException(401, "a valid API key is required (Authorization: Bearer KEY or X-API-Key)",
                                headers={"WWW-Authenticate": "Bearer"})

    def rejected(self, outcome: str, response: Response) -> Response:
        self.metrics.requests.labels(outcome).inc()
        return response

    # -------------------------------------------------------------------------------------------- generate
    async def generate(self, body: GenerateBody, audio_bytes: bytes | None, request: Request,
                       melody_bytes: bytes | None = None) -> Response:
        def check() -> None:
            if body.stream and body.response_format not in encoding.STREAMABLE:
                raise RequestError(f"response_format {body.response_format!r} cannot be streamed; with stream "
                                   f"use one of {encoding.STREAMABLE}")
            if body.response_format == "flac":
                encoding._soundfile()  # fail before generating, not after
        try:
            begun = await self.begin(body.prompt, {name: getattr(body, name) for name in PARAM_FIELDS}, request,
                                     stream=body.stream, audio_bytes=audio_bytes, check=check,
                                     melody_bytes=melody_bytes)
        except Refused as exc:
            return _refused_response(exc)
        headers = {"X-Request-Id": begun.handle.request_id}
        if not body.stream or not isinstance(begun.first, np.ndarray):  # the whole file
            output, data = await self.whole(begun, body.response_format)
            return Response(data, media_type=encoding.MEDIA_TYPES[body.response_format],
                            headers={**headers, **self._audio_headers(output.audio.shape[0], output.sample_rate,
                                                                      output.seed)})
        channels = begun.first.shape[0]
        headers.update(self._audio_headers(channels, self.sample_rate, None))
        return StreamingResponse(self.stream_bytes(begun, body.response_format),
                                 media_type=encoding.MEDIA_TYPES[body.response_format], headers=headers)

    @property
    def sample_rate(self) -> int:
        return self.engine.engine.sample_rate

    async def begin(self, prompt: str | None, fields: dict[str, Any], request: Request, *, stream: bool,
                    audio_bytes: bytes | None = None, check: Callable[[], None] | None = None,
                    melody_bytes: bytes | None = None) -> Begun:
        """Validate (``check`` raises RequestError for what only the route knows), submit, and wait for the first
        event while watching the client; raises Refused with the status to answer (and counts the outcome).
        ``melody_bytes``: a melody file for a MusicGen-Melody checkpoint."""
        if not self.ready:
            raise Refused(503, "the server is not ready", {"Retry-After": "1"})
        try:
            params = SamplingParams(**fields)
            if check is not None:
                check()
            audio = await _decoded(audio_bytes, "audio_prompt")
            melody = await _decoded(melody_bytes, "melody")
            accepted = time.perf_counter()
            handle = await run_in_threadpool(self.engine.submit, prompt, params, audio, melody=melody)
        except QueueFull as exc:
            self.metrics.requests.labels("queue_full").inc()
            raise Refused(503, str(exc), {"Retry-After": str(self.settings.retry_after_s)}) from None
        except RequestError as exc:
            self.metrics.requests.labels("invalid").inc()
            raise Refused(422, str(exc)) from None
        except FastgenError as exc:  # the engine is shutting down
            raise Refused(503, str(exc), {"Retry-After": "1"}) from None
        self.metrics.queue_depth.inc()
        if stream:
            handle.stream(self.settings.stream)
        events = self._track(handle, accepted)
        try:
            first = await self._until_done_or_gone(events.__anext__(), handle, request)
        except _Disconnected:
            raise Refused(499, "the client disconnected") from None
        except RequestAborted as exc:  # the server is shutting down
            raise Refused(503, str(exc), {"Retry-After": "1"}) from None
        except RequestFailed as exc:
            raise Refused(500, str(exc)) from None
        return Begun(handle, events, first, accepted)

    async def whole(self, begun: Begun, response_format: str) -> tuple[Any, bytes]:
        """A request begun without streaming (its first event is the output) → (output, the encoded file)."""
        await begun.events.aclose()  # past the output: ends the tracking (counts the outcome)
        output = begun.first
        self.metrics.time_to_first_audio.observe(time.perf_counter() - begun.accepted)
        data = await run_in_threadpool(encoding.encode_whole, output.audio, output.sample_rate, response_format)
        self.metrics.latency.observe(time.perf_counter() - begun.accepted)
        return output, data

    async def stream_events(self, begun: Begun) -> AsyncIterator[Any]:
        """A streamed request's audio chunks (float32 arrays, the first one first), then its output; aborts the
        request if the consumer stops early (the client went away and the task is cancelled)."""
        self.metrics.time_to_first_audio.observe(time.perf_counter() - begun.accepted)
        try:
            yield begun.first
            async for event in begun.events:
                yield event
            self.metrics.latency.observe(time.perf_counter() - begun.accepted)
        finally:
            if not begun.handle.done:
                self.engine.abort(begun.handle.request_id)
            await begun.events.aclose()

    async def stream_bytes(self, begun: Begun, response_format: str) -> AsyncIterator[bytes]:
        """The streamed file: an open-ended WAV header (wav) and PCM16 as the chunks come."""
        head = encoding.wav_header(begun.first.shape[0], self.sample_rate) if response_format == "wav" else b""
        async for item in self.stream_events(begun):
            if isinstance(item, np.ndarray):  # (the output is not sent: the chunks were all of it)
                yield head + encoding.pcm16(item)
                head = b""

    @staticmethod
    def _audio_headers(channels: int, sample_rate: int, seed: int | None) -> dict[str, str]:
        headers = {"X-Sample-Rate": str(sample_rate), "X-Channels": str(channels)}
        if seed is not None:
            headers["X-Seed"] = str(seed)
        return headers

    async def _track(self, handle, accepted: float) -> AsyncIterator[Any]:
        """The request's audio chunks (streaming) and then its output; keeps the queue / running gauges and the
        outcome counter true whatever happens to the consumer."""
        started = False
        outcome = "disconnected"
        try:
            async for event in handle:
                if event.kind == "started" and not started:
                    started = True
                    self.metrics.queue_depth.dec()
                    self.metrics.running.inc()
                elif event.kind == "audio":
                    yield event.audio
                elif event.kind == "finished":
                    outcome = "finished"
                    self.metrics.audio_seconds.inc(event.output.duration)
                    yield event.output
                elif event.kind in ("failed", "aborted"):
                    outcome = event.kind
                    raise event.error
        finally:
            if started:
                self.metrics.running.dec()
            else:
                self.metrics.queue_depth.dec()
            self.metrics.requests.labels(outcome).inc()  # "disconnected": the consumer left before the end

    async def _until_done_or_gone(self, awaitable, handle, request: Request):
        """Await ``awaitable``; if the client disconnects meanwhile, abort the request and raise _Disconnected."""
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.settings.disconnect_poll_s)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    self.engine.abort(handle.request_id)
                    task.cancel()  # closes the event stream, which counts the request as disconnected
                    with contextlib.suppress(BaseException):
                        await task
                    raise _Disconnected
        finally:
            if not task.done():  # cancelled from outside (shutdown past the grace period)
                task.cancel()
                self.engine.abort(handle.request_id)


class BodyLimit:
    """Refuse a body whose declared length is over ``limit`` before reading it (413), in the error shape of the
    path's API (``respond(path, status, message)``)."""

    def __init__(self, app, limit: int, metrics: ServerMetrics, respond: Callable[[str, int, str], Response]) -> None:
        self.app, self.limit, self.metrics, self.respond = app, limit, metrics, respond

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for name, value in scope.get("headers", []):
                if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                    self.metrics.requests.labels("too_large").inc()
                    response = self.respond(scope["path"], 413, f"the request body is over {self.limit} bytes")
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
