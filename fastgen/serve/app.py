"""The HTTP API: ``POST /v1/audio/generate`` (JSON; the whole file or a chunked stream), its multipart twin for an
uploaded audio prompt, ``GET /health``, ``GET /metrics``. One AsyncEngine per app, built and warmed up in the app's
lifespan (so the same app runs under uvicorn and as a Ray Serve ingress).

A client that disconnects aborts its request (its slot is free before the engine's next step); bad input is a 422
naming the field and its range, a full queue a 503 with Retry-After, a missing key a 401: never a 500."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from fastgen import AsyncEngine, FastgenError, QueueFull, RequestAborted, RequestError, RequestFailed, SamplingParams
from fastgen.engine.streaming import StreamConfig
from fastgen.serve import encoding
from fastgen.serve.metrics import ServerMetrics

PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


@dataclass(frozen=True, slots=True)
class ServerSettings:
    api_key: str | None = None                 # None: no authentication
    max_audio_prompt_bytes: int = 16 << 20     # an uploaded / base64 audio prompt's file size; larger → 413
    retry_after_s: int = 1                     # the Retry-After of a 503 when the queue is full
    stream: StreamConfig = StreamConfig()
    disconnect_poll_s: float = 0.1             # how often a whole-file request checks that its client is there

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None")
        if self.max_audio_prompt_bytes < 1:
            raise ValueError(f"max_audio_prompt_bytes must be ≥ 1, got {self.max_audio_prompt_bytes}")


class GenerateBody(BaseModel):
    """One generation. The sampling fields are fastgen.SamplingParams'; null takes the checkpoint's default."""
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": "lofi beat with warm keys", "duration": 8, "seed": 1, "response_format": "wav", "stream": True}]})
    prompt: str | None = Field(None, description="text prompt; null: unconditional generation")
    duration: float | None = Field(None, description="seconds of new audio, > 0 (the request, prompt included, "
                                                     "at most the engine's max_duration_s; past the model's 30 s "
                                                     "window it slides over windows, see extend_stride)")
    extend_stride: float | None = Field(None, description="long-form: seconds each window after the first adds, in "
                                                          "(0, window); null: 18 s of a 30 s window")
    max_new_tokens: int | None = Field(None, description="decode steps instead of duration, ≥ codebooks")
    guidance_scale: float | None = Field(None, description="classifier-free guidance in [0, 100]; ≤ 1: off")
    temperature: float | None = Field(None, description="in (0, 100]")
    top_k: int | None = Field(None, description="≥ 0; 0: off")
    top_p: float | None = Field(None, description="in [0, 1]; 0 or 1: off")
    do_sample: bool | None = Field(None, description="false: greedy decoding")
    seed: int | None = Field(None, description="in [0, 2**63 - 1]; null: a fresh one (in the X-Seed header)")
    response_format: Literal["wav", "flac", "pcm"] = Field(
        "wav", description="wav (PCM 16-bit), flac, or pcm (raw s16le, interleaved channels)")
    stream: bool = Field(False, description="chunked transfer while the audio is generated (wav or pcm); a "
                                            "streamed WAV header carries sizes 0xFFFFFFFF")
    audio_prompt: str | None = Field(None, description="base64 of a WAV (or, with soundfile, FLAC) file to "
                                                       "continue; size-limited (413)")


class _Disconnected(Exception):
    pass


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    detail = [{"loc": ["body", field] if field else ["body"], "msg": message, "type": "value_error"}]
    return JSONResponse({"detail": detail if status == 422 else message}, status, headers=headers)


def _field_of(message: str) -> str | None:
    """RequestError messages start with the parameter they are about, or (a length over the limit) name it later."""
    words = [w.strip(":,;()") for w in message.split()]
    if words and words[0] in GenerateBody.model_fields:
        return words[0]
    return next((w for w in words if w in GenerateBody.model_fields and w != "prompt"), None)


class _Server:
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
    async def generate(self, body: GenerateBody, audio_bytes: bytes | None, request: Request) -> Response:
        if not self.ready:
            return JSONResponse({"detail": "the server is not ready"}, 503, headers={"Retry-After": "1"})
        try:
            params = SamplingParams(**{name: getattr(body, name) for name in PARAM_FIELDS})
            if body.stream and body.response_format not in encoding.STREAMABLE:
                raise RequestError(f"response_format {body.response_format!r} cannot be streamed; with stream "
                                   f"use one of {encoding.STREAMABLE}")
            if body.response_format == "flac":
                encoding._soundfile()  # fail before generating, not after
            audio = None
            if audio_bytes is not None:
                try:
                    audio = await run_in_threadpool(encoding.decode_upload, audio_bytes)
                except RequestError:
                    raise
                except Exception as exc:  # whatever a malformed file makes a decoder raise is the client's error
                    raise RequestError(f"audio_prompt: not a readable audio file ({type(exc).__name__}: {exc})")

            accepted = time.perf_counter()
            handle = await run_in_threadpool(self.engine.submit, body.prompt, params, audio)
        except QueueFull as exc:
            return self.rejected("queue_full", JSONResponse(
                {"detail": str(exc)}, 503, headers={"Retry-After": str(self.settings.retry_after_s)}))
        except RequestError as exc:
            message = str(exc)
            return self.rejected("invalid", _error(422, message, _field_of(message)))
        except FastgenError as exc:  # the engine is shutting down
            return JSONResponse({"detail": str(exc)}, 503, headers={"Retry-After": "1"})
        self.metrics.queue_depth.inc()
        if body.stream:
            handle.stream(self.settings.stream)
        events = self._track(handle, accepted)
        headers = {"X-Request-Id": handle.request_id}
        try:
            first = await self._until_done_or_gone(events.__anext__(), handle, request)
        except _Disconnected:
            return Response(status_code=499)  # nobody reads it
        except RequestAborted as exc:  # the server is shutting down
            return JSONResponse({"detail": str(exc)}, 503, headers={"Retry-After": "1"})
        except RequestFailed as exc:
            return JSONResponse({"detail": str(exc)}, 500)
        if not body.stream or not isinstance(first, np.ndarray):  # the whole file
            await events.aclose()  # past the output: ends the tracking (counts the outcome)
            output = first
            self.metrics.time_to_first_audio.observe(time.perf_counter() - accepted)
            data = await run_in_threadpool(encoding.encode_whole, output.audio, output.sample_rate,
                                           body.response_format)
            self.metrics.latency.observe(time.perf_counter() - accepted)
            return Response(data, media_type=encoding.MEDIA_TYPES[body.response_format],
                            headers={**headers, **self._audio_headers(output.audio.shape[0], output.sample_rate,
                                                                      output.seed)})
        self.metrics.time_to_first_audio.observe(time.perf_counter() - accepted)
        sample_rate = self.engine.engine.sample_rate
        channels = first.shape[0]
        headers.update(self._audio_headers(channels, sample_rate, None))
        return StreamingResponse(self._stream_body(first, events, handle, body.response_format, channels,
                                                   sample_rate, accepted),
                                 media_type=encoding.MEDIA_TYPES[body.response_format], headers=headers)

    @staticmethod
    def _audio_headers(channels: int, sample_rate: int, seed: int | None) -> dict[str, str]:
        headers = {"X-Sample-Rate": str(sample_rate), "X-Channels": str(channels)}
        if seed is not None:
            headers["X-Seed"] = str(seed)
        return headers

    async def _stream_body(self, first: np.ndarray, events: AsyncIterator, handle, response_format: str,
                           channels: int, sample_rate: int, accepted: float) -> AsyncIterator[bytes]:
        try:
            head = encoding.wav_header(channels, sample_rate) if response_format == "wav" else b""
            yield head + encoding.pcm16(first)
            async for chunk in events:  # chunks, then the output (not sent: the chunks were all of it)
                if isinstance(chunk, np.ndarray):
                    yield encoding.pcm16(chunk)
            self.metrics.latency.observe(time.perf_counter() - accepted)
        finally:  # the client went away (the task is cancelled) or the request ended: never leave it running
            if not handle.done:
                self.engine.abort(handle.request_id)
            await events.aclose()

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


class _BodyLimit:
    """Refuse a body whose declared length is over ``limit`` before reading it (413)."""

    def __init__(self, app, limit: int, metrics: ServerMetrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for name, value in scope.get("headers", []):
                if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                    self.metrics.requests.labels("too_large").inc()
                    response = JSONResponse({"detail": f"the request body is over {self.limit} bytes"}, 413)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def create_app(engine_factory: Callable[[], AsyncEngine], settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The FastAPI app. ``engine_factory`` builds the AsyncEngine at start-up (in a worker thread)."""
    server = _Server(engine_factory, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="fastgen", version="0.1.0", lifespan=lifespan,
                  description="MusicGen text-to-music over HTTP: whole files or audio streamed while generated.")
    app.state.server = server
    limit = settings.max_audio_prompt_bytes
    # base64 is 4/3 the size, plus room for the other fields
    app.add_middleware(_BodyLimit, limit=limit * 4 // 3 + (64 << 10), metrics=server.metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        server.metrics.requests.labels("invalid").inc()
        return JSONResponse({"detail": jsonable_encoder(exc.errors())}, 422)

    authorized = [Depends(server.require_key)]

    def too_large() -> Response:
        return server.rejected("too_large", JSONResponse(
            {"detail": f"audio_prompt is over the limit of {limit} bytes"}, 413))

    @app.post("/v1/audio/generate", response_class=Response, dependencies=authorized, responses={
        200: {"content": {t: {} for t in encoding.MEDIA_TYPES.values()}, "description": "the audio"},
        401: {"description": "missing or wrong API key"}, 413: {"description": "audio_prompt too large"},
        422: {"description": "a field out of range (named in detail[].loc)"},
        503: {"description": "the waiting queue is full (Retry-After)"}})
    async def generate(body: GenerateBody, request: Request) -> Response:
        """Generate music from a text prompt (and optionally continue a base64 audio prompt)."""
        audio_bytes = None
        if body.audio_prompt is not None:
            if len(body.audio_prompt) > limit * 4 // 3 + 4:
                return too_large()
            try:
                audio_bytes = encoding.decode_base64(body.audio_prompt)
            except RequestError as exc:
                return server.rejected("invalid", _error(422, str(exc), "audio_prompt"))
            if len(audio_bytes) > limit:
                return too_large()
        return await server.generate(body, audio_bytes, request)

    @app.post("/v1/audio/generate/upload", response_class=Response, dependencies=authorized)
    async def generate_upload(request: Request,
                              params: str = Form("{}", description="the JSON body of /v1/audio/generate "
                                                                   "(without audio_prompt)"),
                              audio_prompt: UploadFile = File(..., description="an audio file to continue")
                              ) -> Response:
        """The same generation, with the audio prompt as a multipart file upload."""
        try:
            body = GenerateBody.model_validate_json(params)
        except ValidationError as exc:
            server.metrics.requests.labels("invalid").inc()
            errors = [{"loc": ["body", "params", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                      for e in exc.errors()]
            return JSONResponse({"detail": errors}, 422)
        data = await audio_prompt.read(limit + 1)
        if len(data) > limit:
            return too_large()
        return await server.generate(body, data, request)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 once the engine is loaded and warmed up; 503 before and while shutting down."""
        if server.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
