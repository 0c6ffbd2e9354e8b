"""OpenAI's speech API over fastgen, so existing clients work unchanged (the ``openai`` SDK's
``client.audio.speech.create`` and ``with_streaming_response``, Open WebUI's OpenAI speech engine, vllm-omni's ComfyUI
node): ``POST /v1/audio/speech`` and ``GET /v1/models``.

The body is OpenAI's (``model``, ``input``, ``instructions``, ``voice``, ``response_format``, ``speed``,
``stream_format``) plus fastgen's sampling fields at the top level (the SDK's ``extra_body``). Without
``stream_format`` the answer is the whole file; ``audio`` streams it as it is generated (wav and pcm; other formats
arrive whole when done); ``sse`` sends ``speech.audio.delta`` events with base64 audio, then ``speech.audio.done``
with ``usage``. The seed used (drawn below 2**53 when not given, so JavaScript holds it exactly) is in ``X-Seed`` and
in the done event. Errors on these paths have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, so
the SDK raises its typed exceptions; auth, limits, metrics, disconnect-aborts and shutdown are the app's."""
from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any, AsyncIterator, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from fastgen import RequestAborted, RequestError, RequestFailed
from fastgen.serve import encoding
from fastgen.serve.request_path import PARAM_FIELDS, Begun, Refused, ServerState
from fastgen.serve.bodies import field_of

SPEECH_PATH = "/v1/audio/speech"
MODELS_PATH = "/v1/models"
SEED_DRAWN = 1 << 53   # seeds the server draws: below 2**53, exact as a JavaScript number
SSE_FILE_PIECE = 48 << 10  # a whole file (flac, mp3, opus) goes out as SSE deltas of this many bytes
# OpenAI's error type and code for each status this API answers with
_KINDS = {401: ("invalid_request_error", "invalid_api_key"), 413: ("invalid_request_error", "request_too_large"),
          422: ("invalid_request_error", "invalid_value"), 500: ("server_error", "generation_failed"),
          503: ("server_error", "unavailable")}


def speaks_openai(path: str) -> bool:
    """Whether the errors of ``path`` take OpenAI's shape."""
    return path in (SPEECH_PATH, MODELS_PATH)


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind, code = _KINDS.get(status, ("invalid_request_error", None))
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


def validation_error_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """FastAPI's body validation errors as one OpenAI error (422), ``param`` the first bad field."""
    def where(error: dict[str, Any]) -> str:
        return ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    message = "; ".join(f"{where(e)}: {e.get('msg')}" if where(e) else str(e.get("msg")) for e in errors)
    return error_response(422, message or "invalid request body", where(errors[0]) if errors else None)


class _OpenAIError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class SpeechBody(BaseModel):
    """OpenAI's speech request, for music: ``input`` (and ``instructions``) describe it."""
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "musicgen", "input": "lofi beat with warm keys", "voice": "none", "response_format": "wav",
         "duration": 8, "seed": 1}]})
    model: str | None = Field(None, description="accepted and not checked: the server serves one model (its name is "
                                                "GET /v1/models')")
    input: str = Field(..., description="the music's description (the text prompt); empty: unconditional")
    instructions: str | None = Field(None, description="more description, joined to input")
    voice: str | dict[str, Any] | None = Field(None, description="required by OpenAI's SDK; accepted and ignored")
    response_format: str = Field("wav", description="wav (PCM 16-bit), flac, pcm (raw s16le), and mp3 or opus where "
                                                    "soundfile's libsndfile writes them; a 422 names those available")
    speed: float = Field(1.0, description="1.0 only (the music's tempo is the model's)")
    stream_format: Literal["audio", "sse"] | None = Field(
        None, description="null: the whole file; audio: chunked bytes while generated (wav, pcm; other formats "
                          "whole when done); sse: text/event-stream of speech.audio.delta events (base64 audio) "
                          "and a last speech.audio.done with usage")
    duration: float | None = Field(None, description="seconds of audio, > 0; null: the checkpoint's default")
    seed: int | None = Field(None, description="in [0, 2**63 - 1] (a string is fine); null: drawn below 2**53 and "
                                               "returned in X-Seed")
    guidance_scale: float | None = Field(None, description="classifier-free guidance in [0, 100]; ≤ 1: off")
    temperature: float | None = Field(None, description="in (0, 100]")
    top_k: int | None = Field(None, description="≥ 0; 0: off")
    top_p: float | None = Field(None, description="in [0, 1]; 0 or 1: off")
    do_sample: bool | None = Field(None, description="false: greedy decoding")

    def description(self) -> str | None:
        """``input`` and ``instructions`` as one prompt (None when both are empty: unconditional)."""
        parts = [p.strip() for p in (self.input, self.instructions) if p and p.strip()]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return parts[0] + ("" if parts[0][-1] in ".,;:!?" else ".") + " " + parts[1]


def _param(message: str) -> str | None:
    field = field_of(message, {*SpeechBody.model_fields, "prompt"})
    return "input" if field == "prompt" else field


def _refused(exc: Refused) -> Response:
    if exc.status == 499:
        return Response(status_code=499)
    return error_response(exc.status, exc.message, _param(exc.message) if exc.status == 422 else None, exc.headers)


def _event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _delta(data: bytes) -> bytes:
    return _event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})


def _count_text_tokens(server: ServerState, prompt: str | None) -> int:
    """The prompt's text tokens, for usage (the engine's tokenizer, under the lock its intake takes)."""
    if prompt is None:
        return 0
    try:
        core = server.engine.engine
        with core.intake.tokenizer_lock:
            return len(core.model.text_encoder.tokenize(prompt))
    except Exception:  # usage is informative: never fail a finished request over it
        return 0


async def _sse(server: ServerState, begun: Begun, response_format: str, prompt: str | None,
               seed: int) -> AsyncIterator[bytes]:
    """The SSE body: the streamed bytes (or the whole file, in pieces) as deltas, then done (or an error event)."""
    output = None
    try:
        if isinstance(begun.first, np.ndarray):  # wav or pcm, streamed: the bytes of stream_format audio
            async for item in server.stream_events(begun):
                if isinstance(item, np.ndarray):
                    head = b""
                    if item is begun.first and response_format == "wav":
                        head = encoding.wav_header(item.shape[0], server.sample_rate)
                    yield _delta(head + encoding.pcm16(item))
                else:
                    output = item
        else:
            output, data = await server.whole(begun, response_format)
            for start in range(0, len(data), SSE_FILE_PIECE):
                yield _delta(data[start:start + SSE_FILE_PIECE])
    except (RequestFailed, RequestAborted) as exc:  # after the 200: the stream says it
        kind = "generation_failed" if isinstance(exc, RequestFailed) else "aborted"
        yield _event({"type": "error", "error": {"message": str(exc), "type": "server_error", "param": None,
                                                 "code": kind}})
        return
    input_tokens = await run_in_threadpool(_count_text_tokens, server, prompt)
    output_tokens = int(output.codes[:, output.prompt_frames:].size)  # audio codes: codebooks × frames
    yield _event({"type": "speech.audio.done",
                  "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                            "total_tokens": input_tokens + output_tokens},
                  "seed": str(seed), "request_id": begun.handle.request_id})


def add_routes(app: FastAPI, server: ServerState, model_name: str) -> None:
    created = int(time.time())

    @app.exception_handler(_OpenAIError)
    async def openai_error(request: Request, exc: _OpenAIError) -> JSONResponse:
        return error_response(exc.status, exc.message, headers=exc.headers)

    def require_key(request: Request) -> None:
        if not server.authorized(request):
            server.metrics.requests.labels("unauthorized").inc()
            raise _OpenAIError(401, "a valid API key is required (Authorization: Bearer KEY or X-API-Key)",
                               headers={"WWW-Authenticate": "Bearer"})
    authorized = [Depends(require_key)]

    @app.get(MODELS_PATH, dependencies=authorized)
    async def models() -> dict[str, Any]:
        """OpenAI's model list: the one model this server serves."""
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "fastgen"}]}

    @app.post(SPEECH_PATH, response_class=Response, dependencies=authorized, responses={
        200: {"content": {**{encoding.MEDIA_TYPES[f]: {} for f in encoding.SPEECH_FORMATS},
                          "text/event-stream": {}}, "description": "the audio, or SSE events"},
        401: {"description": "missing or wrong API key"},
        422: {"description": "a field out of range (error.param names it)"},
        503: {"description": "the waiting queue is full (Retry-After)"}})
    async def speech(body: SpeechBody, request: Request) -> Response:
        """Generate music from a description, OpenAI's speech API's way (fastgen's sampling fields as extra keys)."""
        response_format = body.response_format
        seed = body.seed if body.seed is not None else secrets.randbelow(SEED_DRAWN)
        stream = body.stream_format is not None and response_format in encoding.STREAMABLE

        def check() -> None:
            if body.speed != 1.0:
                raise RequestError(f"speed must be 1.0: the music's tempo is the model's, got {body.speed}")
            encoding.check_speech_format(response_format)
        fields = {name: getattr(body, name, None) for name in PARAM_FIELDS} | {"seed": seed}
        prompt = body.description()
        try:
            begun = await server.begin(prompt, fields, request, stream=stream, check=check)
        except Refused as exc:
            return _refused(exc)
        streamed = isinstance(begun.first, np.ndarray)
        channels = begun.first.shape[0] if streamed else begun.first.audio.shape[0]
        headers = {"X-Request-Id": begun.handle.request_id, "X-Seed": str(seed),
                   "X-Sample-Rate": str(server.sample_rate), "X-Channels": str(channels)}
        if body.stream_format == "sse":
            return StreamingResponse(_sse(server, begun, response_format, prompt, seed), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        media_type = encoding.MEDIA_TYPES[response_format]
        if streamed:
            return StreamingResponse(server.stream_bytes(begun, response_format), media_type=media_type,
                                     headers=headers)
        _, data = await server.whole(begun, response_format)
        return Response(data, media_type=media_type, headers=headers)
