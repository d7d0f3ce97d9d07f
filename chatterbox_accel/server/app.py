"""An OpenAI-compatible speech API on the engine (FastAPI).

    app = create_app(engine, voices_dir="voices", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)      # or: chatterbox-accel serve

Routes: POST /v1/audio/speech (OpenAI's schema plus Chatterbox's options; streams for every
format), GET/POST /v1/audio/voices, DELETE /v1/audio/voices/{id}, GET /v1/audio/models,
GET /v1/models, GET /health, GET /ready, GET /metrics, GET / (a page to try it).

Handlers validate, submit to the engine and stream its events: the engine's thread alone runs
the model, encoding runs in worker threads, so the event loop never waits on compute. Errors
use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal, Optional, Union

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from ..engine import AudioChunk, Done, EngineBusy, EngineClosed, Failed, SpeechRequest
from ..engine.voices import DEFAULT
from .encode import Encoder
from .metrics import Metrics, Playback

logger = logging.getLogger(__name__)

MAX_INPUT = 4096                 # characters, as OpenAI's API
MAX_UPLOAD = 10 << 20            # bytes of a voice upload
MAX_BODY = 256 << 10             # bytes of a speech request's JSON
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".opus")
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar")
VOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
OPTIONS = ("exaggeration", "cfg_weight", "temperature", "min_p", "top_p", "repetition_penalty", "top_k",
           "language")
PAGE = Path(__file__).with_name("page.html")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


class VoiceRef(BaseModel):
    id: str


class SpeechBody(BaseModel):
    """OpenAI's /v1/audio/speech body; Chatterbox's options as extra fields."""

    model_config = ConfigDict(extra="forbid")
    model: str = "chatterbox"
    input: str = Field(max_length=MAX_INPUT)
    voice: Union[str, VoiceRef] = DEFAULT
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: Optional[str] = None  # accepted; Chatterbox has no instruction input (X-Instructions: ignored)
    exaggeration: Optional[float] = Field(None, ge=0.0, le=2.0)
    cfg_weight: Optional[float] = Field(None, ge=0.0, le=1.0)
    temperature: Optional[float] = Field(None, gt=0.0, le=5.0)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, ge=1.0, le=10.0)
    top_k: Optional[int] = Field(None, ge=1, le=10000)
    language: Optional[str] = None
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    max_new_tokens: Optional[int] = Field(None, ge=1)


def create_app(engine, *, voices_dir=None, api_key: str | None = None, model_name: str = "chatterbox",
               request_timeout: float = 300.0, max_new_tokens: int | None = None, voice_map: dict | None = None,
               description: str = "") -> FastAPI:
    """The API on `engine` (which the caller started and closes). voices_dir: reference audio
    and voice profiles registered at start, where uploads are kept (None: a temporary folder,
    gone when the process ends). voice_map: OpenAI voice names -> registered voices."""
    app = FastAPI(title="chatterbox-accel", docs_url=None, redoc_url=None)
    metrics = Metrics(engine)
    family = engine.family
    if voices_dir is None:
        voices_dir = Path(tempfile.mkdtemp(prefix="chatterbox-accel-voices-"))
        persistent = False
    else:
        voices_dir, persistent = Path(voices_dir), True
        voices_dir.mkdir(parents=True, exist_ok=True)
    folder = VoiceFolder(engine, voices_dir)
    folder.sync()
    voice_map = dict(voice_map or {})
    limit = max_new_tokens or engine.max_new_tokens
    created: dict[str, int] = {}
    state = {"voices_dir": voices_dir, "folder": folder, "persistent": persistent, "metrics": metrics, "description": description}
    app.state.chatterbox = state

    # ---- errors, auth ----------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = (f"unknown field {param!r}; known: {', '.join(SpeechBody.model_fields)}")
        elif param:
            message = f"{param}: {message}"
        return ApiError(400, message, param, first.get("type")).response()

    body_limits = {"/v1/audio/voices": MAX_UPLOAD + (64 << 10), "/v1/audio/speech": MAX_BODY}

    @app.middleware("http")
    async def _auth_and_size(request: Request, call_next):
        path = request.url.path
        limit = body_limits.get(path)
        if request.method == "POST" and limit:  # bounded before anything is read or spooled
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return ApiError(411, "send a Content-Length (chunked request bodies are not accepted)",
                                code="length_required").response()
            if int(length) > limit:
                return ApiError(413, f"the request body is {int(length)} bytes, over this route's {limit}; "
                                     + ("send a reference of at most 10 MiB" if "voices" in path else
                                        "input is at most 4096 characters"), code="body_too_large").response()
        if api_key and path not in ("/", "/health", "/ready", "/metrics"):
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key").response()
        return await call_next(request)

    # ---- operations -------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if engine.ready():
            return {"status": "ready", "in_flight": engine.in_flight, "running": engine.running}
        return JSONResponse({"status": "not ready", "error": str(engine.error) if engine.error else None},
                            status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    # ---- models and voices ----------------------------------------------------------------------
    models = [model_name, "tts-1", "tts-1-hd", "gpt-4o-mini-tts"]

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "chatterbox-accel"}
                                           for m in models]}

    @app.get("/v1/audio/models")
    async def audio_models():
        return {"models": [{"id": m} for m in models]}

    @app.get("/v1/audio/voices")
    async def list_voices():
        await asyncio.to_thread(folder.sync)
        names = engine.voices.names()
        return {"voices": [{"id": n, "name": n} for n in names] +
                [{"id": n, "name": f"{n} (-> {voice_map.get(n, DEFAULT)})"} for n in OPENAI_VOICES if n not in names]}

    @app.post("/v1/audio/voices")
    async def create_voice(name: str = Form(...), audio_sample: UploadFile = File(...)):
        if not VOICE_NAME.match(name) or name == DEFAULT or name in OPENAI_VOICES:
            raise ApiError(400, f"voice name {name!r} is not usable: 1-64 letters, digits, '_' or '-', starting "
                                f"with a letter or digit, and not {DEFAULT!r} or an OpenAI voice name", "name")
        await asyncio.to_thread(folder.sync)
        if name in engine.voices.names():
            raise ApiError(409, f"a voice named {name!r} exists; delete it first or pick another name", "name",
                           "voice_exists")
        suffix = Path(audio_sample.filename or "").suffix.lower()
        suffix = suffix if suffix in AUDIO_SUFFIXES else ".wav"
        data = await audio_sample.read(MAX_UPLOAD + 1)
        if len(data) > MAX_UPLOAD:
            raise ApiError(413, f"audio_sample is over {MAX_UPLOAD >> 20} MiB; send a shorter reference "
                                "(10-20 s of speech is plenty)", "audio_sample", "file_too_large")
        target = voices_dir / f"{name}{suffix}"
        try:
            await asyncio.to_thread(_store_voice, engine, folder, name, data, target)
        except (ValueError, OSError, RuntimeError) as exc:
            raise ApiError(400, f"audio_sample is not usable as a voice: {exc}", "audio_sample") from None
        created[name] = int(time.time())
        return {"object": "audio.voice", "id": name, "name": name, "created_at": created[name]}

    @app.delete("/v1/audio/voices/{voice_id}")
    async def delete_voice(voice_id: str):
        await asyncio.to_thread(folder.sync)
        if not VOICE_NAME.match(voice_id) or voice_id not in engine.voices.sources:
            raise ApiError(404, f"no voice {voice_id!r}", "voice_id", "voice_not_found")
        path = Path(engine.voices.sources[voice_id][1])
        if path.parent == voices_dir:
            path.unlink(missing_ok=True)
        with folder.lock:
            if voice_id in engine.voices.sources:
                engine.voices.remove(voice_id)
        await asyncio.to_thread(folder.sync)
        created.pop(voice_id, None)
        return {"object": "audio.voice.deleted", "id": voice_id, "deleted": True}

    # ---- speech ---------------------------------------------------------------------------------
    def resolve_voice(voice) -> str:
        name = voice.id if isinstance(voice, VoiceRef) else voice
        if name in engine.voices:
            return name
        if name in OPENAI_VOICES:
            return voice_map.get(name, DEFAULT)
        raise ApiError(400, f"unknown voice {name!r}; GET /v1/audio/voices lists them "
                            f"({', '.join(engine.voices.names())}, or an OpenAI voice name)", "voice", "voice_not_found")

    def speech_request(body: SpeechBody) -> SpeechRequest:
        if not body.input.strip():
            raise ApiError(400, "input is empty: send the text to speak", "input")
        options = {k: getattr(body, k) for k in OPTIONS if getattr(body, k) is not None}
        if "language" in options:
            if family != "multilingual":
                raise ApiError(400, f"language applies to the multilingual model; this server runs {family}",
                               "language")
            options["language_id"] = options.pop("language")
        if body.max_new_tokens is not None and body.max_new_tokens > limit:
            raise ApiError(400, f"max_new_tokens {body.max_new_tokens} is over this server's limit {limit}",
                           "max_new_tokens")
        return SpeechRequest(body.input, voice=resolve_voice(body.voice), options=options, seed=body.seed,
                             max_new_tokens=body.max_new_tokens)

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechBody, request: Request):
        await asyncio.to_thread(folder.sync)
        try:
            speech_req = speech_request(body)
            handle = engine.submit(speech_req)
        except EngineBusy as exc:
            metrics.rejections.labels("busy").inc()
            raise ApiError(429, str(exc), code="engine_busy", kind="rate_limit_error",
                           headers={"Retry-After": str(max(1, round(exc.retry_after)))}) from None
        except EngineClosed as exc:
            metrics.rejections.labels("closed").inc()
            raise ApiError(503, str(exc), code="engine_closed", kind="server_error") from None
        except (ValueError, KeyError, TypeError) as exc:
            metrics.rejections.labels("invalid").inc()
            raise ApiError(400, str(exc).strip("'\""), code="invalid_value") from None
        submitted = time.perf_counter()
        deadline = submitted + request_timeout
        try:
            first = await _next(handle, deadline)
        except BaseException:
            handle.cancel()
            raise
        if isinstance(first, Failed):
            handle.cancel()
            metrics.requests.labels(str(_status(first.error))).inc()
            raise _failure(first.error)
        encoder = Encoder(body.response_format, engine.model.sr, speed=body.speed)
        headers = {"X-Voice": speech_req.voice or DEFAULT, "Cache-Control": "no-store"}
        if body.instructions:
            headers["X-Instructions"] = "ignored: Chatterbox takes no instructions"
        sse = body.stream_format == "sse"
        events = _events(handle, first, encoder, deadline, submitted, metrics, engine.model.sr, sse, body.speed)
        media_type = "text/event-stream" if sse else encoder.media_type
        return StreamingResponse(events, media_type=media_type, headers=headers)

    return app


async def _next(handle, deadline: float):
    timeout = deadline - time.perf_counter()
    if timeout <= 0:
        return Failed(TimeoutError("the request ran past the server's deadline"))
    try:
        return await asyncio.wait_for(handle.aget(), timeout)
    except asyncio.TimeoutError:
        return Failed(TimeoutError("the request ran past the server's deadline"))


async def _events(handle, first, encoder, deadline, submitted, metrics, sample_rate, sse: bool, speed: float):
    """The response body: encoded audio (or SSE events) as the engine's chunks come. Audio
    seconds, playback and usage count the audio sent (the model's, divided by `speed`)."""
    playback = Playback(sample_rate)
    metrics.responses.inc()
    status, event = "200", first
    try:
        while True:
            if isinstance(event, AudioChunk):
                now = time.perf_counter() - submitted
                interval = playback.chunk(now, round(event.audio.numel() / speed))
                if interval is None:
                    metrics.first_audio.observe(now)
                else:
                    metrics.interval.observe(interval)
                data = await asyncio.to_thread(encoder.encode, event.audio.numpy())
                if data:
                    yield _sse_delta(data) if sse else data
            elif isinstance(event, Done):
                tail = await asyncio.to_thread(encoder.close)
                if tail:
                    yield _sse_delta(tail) if sse else tail
                usage = event.usage
                seconds = usage.audio_seconds / speed
                total = time.perf_counter() - submitted
                metrics.latency.observe(total)
                metrics.audio.inc(seconds)
                if seconds:
                    metrics.rtf.observe(total / seconds)
                metrics.underrun.observe(max(0.0, playback.underrun))
                if sse:
                    yield _sse({"type": "speech.audio.done", "usage": {
                        "input_tokens": usage.text_tokens, "output_tokens": usage.speech_tokens,
                        "total_tokens": usage.text_tokens + usage.speech_tokens,
                        "audio_seconds": round(seconds, 3)}})
                return
            else:  # Failed mid-stream: the status is sent; end the body (SSE says why)
                status = str(_status(event.error))
                logger.warning("speech request failed mid-stream: %s", event.error)
                if sse:
                    error = _failure(event.error)
                    yield _sse({"type": "speech.audio.error", "error": {"message": error.message,
                                                                        "type": error.kind, "code": error.code}})
                return
            event = await _next(handle, deadline)
    except asyncio.CancelledError:  # the client went away
        status = "499"
        raise
    finally:
        handle.cancel()
        metrics.responses.dec()
        metrics.requests.labels(status).inc()


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _sse_delta(data: bytes) -> bytes:
    return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})


def _status(error: BaseException) -> int:
    if isinstance(error, EngineBusy):
        return 429
    if isinstance(error, EngineClosed):
        return 503
    if isinstance(error, TimeoutError):
        return 504
    if isinstance(error, (ValueError, KeyError)):
        return 400
    return 500


def _failure(error: BaseException) -> ApiError:
    status = _status(error)
    kind = {400: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
    message = str(error).strip("'\"") or type(error).__name__
    if status == 500:
        message = f"generation failed: {type(error).__name__}: {message}"
    return ApiError(status, message, kind=kind, code={504: "timeout", 503: "engine_closed"}.get(status))


class VoiceFolder:
    """The voices folder as the registry's source of truth: a voice file there is registered
    under its stem, a file gone is unregistered, a replaced one (new mtime) re-registered.
    Servers sharing one folder (Ray Serve replicas on a shared volume) see each other's uploads
    and deletes at their next request; `sync` is a directory scan (tens of microseconds for a
    few dozen voices), run in a worker thread. A file that is not a usable reference is logged
    once and skipped until it changes."""

    def __init__(self, engine, path: Path):
        self.engine, self.path = engine, Path(path)
        self.seen: dict[str, tuple[str, int]] = {}  # name -> (path, mtime_ns), registered or rejected
        self.lock = threading.Lock()

    def sync(self) -> None:
        present: dict[str, tuple[str, int]] = {}
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            stem, suffix = os.path.splitext(entry.name)
            if suffix.lower() in AUDIO_SUFFIXES + (".pt",) and VOICE_NAME.match(stem) and entry.is_file():
                present.setdefault(stem, (entry.path, entry.stat().st_mtime_ns))
        voices = self.engine.voices
        with self.lock:
            for name, (path, _) in list(self.seen.items()):
                if present.get(name, (None,))[0] != path:
                    del self.seen[name]
                    if voices.sources.get(name, (None, None))[1] == path:
                        voices.remove(name)
            for name, key in present.items():
                if self.seen.get(name) == key:
                    continue
                self.seen[name] = key
                try:
                    voices.add(name, key[0])
                except (ValueError, OSError, RuntimeError) as exc:
                    logger.warning("voice %s skipped: %s", os.path.basename(key[0]), exc)


def _store_voice(engine, folder: VoiceFolder, name: str, data: bytes, target: Path) -> None:
    """Write an upload next to its final name, check it as a reference (readable audio, long
    enough; Turbo > 5 s), only then move it in and register it (through the folder)."""
    from ..voice import check_reference_audio

    tmp = target.with_name(f".upload-{name}{target.suffix}")
    tmp.write_bytes(data)
    try:
        check_reference_audio(tmp, engine.model)
        shutil.move(str(tmp), target)
        folder.sync()
    finally:
        tmp.unlink(missing_ok=True)
