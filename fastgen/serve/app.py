"""The HTTP API: ``POST /v1/audio/generate`` (JSON; the whole file or a chunked stream), its multipart twin for an
uploaded audio prompt, OpenAI's ``POST /v1/audio/speech`` and ``GET /v1/models`` (fastgen.serve.openai_routes), the
web page at ``GET /`` (static/index.html), ``GET /health``, ``GET /metrics``. One AsyncEngine per app, built and
warmed up in the app's lifespan (so the same app runs under uvicorn and as a Ray Serve ingress).

A client that disconnects aborts its request (its slot is free before the engine's next step); bad input is a 422
naming the field and its range, a full queue a 503 with Retry-After, a missing key a 401: never a 500."""
from __future__ import annotations

import contextlib
from importlib import resources
from typing import Callable

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError

from fastgen import AsyncEngine, RequestError
from fastgen.serve import encoding, openai_routes
from fastgen.serve.bodies import GenerateBody
from fastgen.serve.request_path import BodyLimit, ServerSettings, ServerState, error_json

def create_app(engine_factory: Callable[[], AsyncEngine], settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The FastAPI app. ``engine_factory`` builds the AsyncEngine at start-up (in a worker thread)."""
    server = ServerState(engine_factory, settings)

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

    def error_for(path: str, status: int, message: str) -> Response:
        if openai_routes.speaks_openai(path):
            return openai_routes.error_response(status, message)
        return JSONResponse({"detail": message}, status)
    # base64 is 4/3 the size (an audio prompt and a melody), plus room for the other fields
    app.add_middleware(BodyLimit, limit=2 * limit * 4 // 3 + (64 << 10), metrics=server.metrics, respond=error_for)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        server.metrics.requests.labels("invalid").inc()
        if openai_routes.speaks_openai(request.url.path):
            return openai_routes.validation_error_response(exc.errors())
        return JSONResponse({"detail": jsonable_encoder(exc.errors())}, 422)

    authorized = [Depends(server.require_key)]

    def too_large(name: str = "audio_prompt") -> Response:
        return server.rejected("too_large", JSONResponse(
            {"detail": f"{name} is over the limit of {limit} bytes"}, 413))

    @app.post("/v1/audio/generate", response_class=Response, dependencies=authorized, responses={
        200: {"content": {encoding.MEDIA_TYPES[f]: {} for f in encoding.FORMATS}, "description": "the audio"},
        401: {"description": "missing or wrong API key"}, 413: {"description": "audio_prompt or melody too large"},
        422: {"description": "a field out of range (named in detail[].loc)"},
        503: {"description": "the waiting queue is full (Retry-After)"}})
    async def generate(body: GenerateBody, request: Request) -> Response:
        """Generate music from a text prompt (and optionally continue a base64 audio prompt, or follow a base64
        melody on a melody checkpoint)."""
        files: dict[str, bytes | None] = {}
        for name in ("audio_prompt", "melody"):
            text, files[name] = getattr(body, name), None
            if text is None:
                continue
            if len(text) > limit * 4 // 3 + 4:
                return too_large(name)
            try:
                files[name] = encoding.decode_base64(text, name)
            except RequestError as exc:
                return server.rejected("invalid", error_json(422, str(exc), name))
            if len(files[name]) > limit:
                return too_large(name)
        return await server.generate(body, files["audio_prompt"], request, files["melody"])

    @app.post("/v1/audio/generate/upload", response_class=Response, dependencies=authorized)
    async def generate_upload(request: Request,
                              params: str = Form("{}", description="the JSON body of /v1/audio/generate "
                                                                   "(without audio_prompt and melody)"),
                              audio_prompt: UploadFile | None = File(None, description="an audio file to continue"),
                              melody: UploadFile | None = File(None, description="a melody (MusicGen-Melody "
                                                                                 "checkpoints)")) -> Response:
        """The same generation, with the audio prompt or the melody (or both) as multipart file uploads."""
        try:
            body = GenerateBody.model_validate_json(params)
        except ValidationError as exc:
            server.metrics.requests.labels("invalid").inc()
            errors = [{"loc": ["body", "params", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                      for e in exc.errors()]
            return JSONResponse({"detail": errors}, 422)
        if audio_prompt is None and melody is None:
            server.metrics.requests.labels("invalid").inc()
            return error_json(422, "upload an audio_prompt or a melody file (or both)", "audio_prompt")
        files: dict[str, bytes | None] = {}
        for name, upload in (("audio_prompt", audio_prompt), ("melody", melody)):
            files[name] = None if upload is None else await upload.read(limit + 1)
            if files[name] is not None and len(files[name]) > limit:
                return too_large(name)
        return await server.generate(body, files["audio_prompt"], request, files["melody"])

    openai_routes.add_routes(app, server, settings.model_name or getattr(engine_factory, "model", None)
                             or "musicgen")
    page = resources.files("fastgen.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        """The page to try prompts and listen (no key needed to load it; it asks for one if the server does)."""
        return HTMLResponse(page)

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
