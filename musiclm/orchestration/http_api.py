"""The HTTP layer of one ingress: a FastAPI app around a :class:`~musiclm.orchestration.service.MusicLMService`.

    GET  /                  a small web page (prompt, duration, story editor, melody upload, player, spectrogram)
    GET  /health            which stages are loaded, from which checkpoints; batching counts; the metrics URL
    POST /generate          JSON (schemas.GenerateRequest) -> audio/wav, 16-bit PCM, 24 kHz, one channel per sample
    POST /generate/melody   multipart: ``request`` (that JSON) + ``melody`` (an audio file) -> the same

Read top to bottom: the one error shape, WAV bytes (whole or streamed: the header first, exact length),
request parsing and uploads (bounded reads, limits checked before decoding), answering a request whole or
streamed, and :func:`create_app` with its routes, error handlers and request log.

Protection: every 4xx is JSON ``{"error": {"field", "message"}}``; an ingress replica holds at most
``max_queued_requests`` generations and answers 429 (``Retry-After``) beyond that, as it does when a
stage's queue rejects a call (Serve's ``BackPressureError``); a generation that takes longer than
``request_timeout_s`` answers 504. Every request has an id (``X-Request-Id`` in, or a new one; always
out) that the one JSON log line per request carries.

(No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` annotations.)
"""

import asyncio
import io
import json
import logging
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import numpy as np
import soundfile as sf
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException

from musiclm.constants import SAMPLE_RATE
from musiclm.generation.spec import GenerationSpec
from musiclm.orchestration.schemas import (
    GenerateRequest,
    ValidationError,
    describe_validation_error,
    request_json_schema,
)
from musiclm.orchestration.serve_config import MODEL_DEPLOYMENTS, ServeConfig
from musiclm.orchestration.serve_metrics import metrics_url
from musiclm.orchestration.service import RETRY_AFTER_S, ClientError, MusicLMService
from musiclm.tokenizers.contour import melody_contour

logger = logging.getLogger("ray.serve")

HEALTH_TIMEOUT_S = 10.0  # how long GET /health waits for each deployment's answer
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # an X-Request-Id kept as given (anything else: a new id)


# ----------------------------------------------------------------------------- errors


def error_response(status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one shape of every error answer: ``{"error": {"field": ..., "message": ...}}``."""
    return JSONResponse({"error": {"field": field, "message": message}}, status_code=status, headers=headers)


_ERROR_SCHEMA = {
    "application/json": {
        "schema": {
            "type": "object",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {"field": {"type": ["string", "null"]}, "message": {"type": "string"}},
                }
            },
        }
    }
}
_AUDIO = {"audio/wav": {"schema": {"type": "string", "format": "binary"}}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": _AUDIO, "description": "16-bit PCM WAV at 24 kHz, one channel per sample (chunked if stream)"},
    400: {"description": "malformed JSON or multipart body", "content": _ERROR_SCHEMA},
    413: {"description": "body or upload too large", "content": _ERROR_SCHEMA},
    415: {"description": "wrong content type or audio format", "content": _ERROR_SCHEMA},
    422: {"description": "invalid field (named in error.field)", "content": _ERROR_SCHEMA},
    429: {"description": "too many requests queued (see Retry-After)", "content": _ERROR_SCHEMA},
    503: {"description": "a stage is unavailable", "content": _ERROR_SCHEMA},
    504: {"description": "generation timed out", "content": _ERROR_SCHEMA},
}

# ----------------------------------------------------------------------------- WAV bytes


def wav_header(frames: int, channels: int = 1, sample_rate: int = SAMPLE_RATE) -> bytes:
    """The 44-byte header of a 16-bit PCM WAV of ``frames`` frames (sizes saturate at 0xFFFFFFFF, as
    streaming writers do, past 4 GiB)."""
    data = frames * channels * 2
    riff = min(36 + data, 0xFFFFFFFF)
    return (
        b"RIFF" + struct.pack("<I", riff) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16)
        + b"data" + struct.pack("<I", min(data, 0xFFFFFFFF))
    )


def pcm16(audio: np.ndarray) -> bytes:
    """float audio [C, T] in [-1, 1] -> interleaved little-endian 16-bit PCM."""
    audio = np.atleast_2d(np.nan_to_num(np.asarray(audio, dtype=np.float32)))
    return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").T.tobytes()  # [C, T] -> [T, C]


def encode_wav(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """float32 [T] or [C, T] in [-1, 1] → the bytes of a 16-bit PCM WAV file (C channels)."""
    audio = np.atleast_2d(np.asarray(wav))
    return wav_header(audio.shape[1], audio.shape[0], sample_rate) + pcm16(audio)


# ----------------------------------------------------------------------------- requests and uploads


async def _read_capped(request: Request, cap: int) -> bytes | None:
    """The body, or None once it passes ``cap`` bytes (read no further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _parse(data: Any, config: ServeConfig) -> GenerateRequest:
    try:
        return GenerateRequest.model_validate(data, context=config.limits())
    except ValidationError as exc:
        described = describe_validation_error(exc.errors())
        raise ClientError(422, described["field"], described["message"]) from exc


def _json_body(body: bytes, field: str = "body") -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ClientError(400, field, f"malformed JSON: {exc}") from exc


def decode_upload(data: bytes, config: ServeConfig) -> np.ndarray:
    """An uploaded melody file -> float32 mono [T] at 24 kHz; ClientError 413 / 415 / 422 otherwise."""
    from musiclm.audio.io import AudioError, decode_audio_bytes

    if len(data) > config.max_upload_bytes:
        raise ClientError(413, "melody", f"melody file has {len(data)} bytes; at most {config.max_upload_bytes}")
    if not data:
        raise ClientError(422, "melody", "melody file is empty")
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - libsndfile's many ways of saying "not audio"
        raise ClientError(
            415, "melody", f"melody is not an audio file this server reads ({', '.join(config.upload_formats)})"
        ) from exc
    fmt = str(info.format).lower()
    if fmt not in config.upload_formats:
        raise ClientError(415, "melody", f"melody format '{fmt}' is not accepted; use one of {', '.join(config.upload_formats)}")
    if info.samplerate <= 0 or info.channels <= 0:
        raise ClientError(422, "melody", "melody file declares no samples")
    seconds = info.frames / info.samplerate if 0 <= info.frames < (1 << 62) else float("inf")
    if seconds > config.max_seconds:  # checked before decoding: a small compressed file may hold hours
        raise ClientError(422, "melody", f"melody lasts {seconds:g} s; at most {config.max_seconds:g} s")
    try:
        return decode_audio_bytes(data, SAMPLE_RATE)
    except AudioError as exc:
        raise ClientError(422, "melody", f"melody cannot be decoded: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - libsndfile / soxr on hostile input
        raise ClientError(422, "melody", f"melody cannot be decoded: {type(exc).__name__}") from exc


def _serve_request_id() -> str | None:
    """The id Ray Serve gave this HTTP request (the client's ``X-Request-Id`` when it sent one), or None
    outside a Serve replica."""
    try:
        serve.get_replica_context()
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # noqa: BLE001 - not in a replica (the in-process app)
        return None


def _web_page() -> str:
    return resources.files("musiclm.orchestration").joinpath("web/index.html").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- answering


async def _respond(
    service: MusicLMService, request: Request, parsed: GenerateRequest, melody: np.ndarray | None
) -> Response:
    """Admit, plan, execute (whole or streamed) and answer; every refusal a ClientError."""
    arrived = time.perf_counter()
    request.state.prompt_chars = parsed.prompt_chars
    request.state.seconds = parsed.total_seconds
    request.state.num_samples = parsed.num_samples
    request.state.stream = parsed.stream
    service.admit()
    released = handed_over = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            service.release()

    try:
        contour = None
        if melody is not None:  # first: a cheap check that a too-short melody gets its 422, not a model's error
            try:
                contour = await asyncio.to_thread(melody_contour, melody)  # [F], numpy only
            except ValueError as exc:
                raise ClientError(422, "melody", str(exc)) from exc
        melody_tokens = None if melody is None else await service.melody_tokens(melody)
        spec = await service.spec(parsed, melody_tokens, contour)
        configs = await service.stage_configs()
        frames = service.total_frames(spec, configs)
        deadline = arrived + service.config.request_timeout_s
        headers = {"X-Seed": str(parsed.seed), "X-Samples": str(parsed.num_samples),
                   "X-Seconds": f"{frames / SAMPLE_RATE:.6f}"}
        if parsed.stream:
            response = await _stream(service, request, spec, frames, deadline, headers, release, arrived)
            handed_over = True  # the stream's producer releases the slot when it ends
            return response
        try:
            remaining = max(0.0, deadline - time.perf_counter())
            audio, extras = await asyncio.wait_for(service.collect(spec), timeout=remaining)
        except asyncio.TimeoutError as exc:
            raise ClientError(504, None, f"generation took longer than {service.config.request_timeout_s:g} s",
                              {"Retry-After": "30"}) from exc
        elapsed = time.perf_counter() - arrived
        service.metrics.observe("generation", elapsed, request.url.path)
        service.metrics.observe("audio", audio.shape[1] / SAMPLE_RATE * audio.shape[0])
        if parsed.rerank:
            headers["X-Rerank-Scores"] = ",".join(f"{s:.6f}" for s in np.asarray(extras.get("scores", [])))
            headers["X-Rerank-Order"] = ",".join(str(int(i)) for i in np.asarray(extras.get("order", [])))
            headers["X-Samples"] = "1"
            audio = audio[:1]  # rows come best first
        headers["X-Generation-Time"] = f"{elapsed:.4f}"
        return Response(content=encode_wav(audio), media_type="audio/wav", headers=headers)
    except (BackPressureError, DeploymentUnavailableError) as exc:
        if isinstance(exc, BackPressureError):
            raise ClientError(429, None, f"a stage's queue is full: {exc}",
                              {"Retry-After": str(RETRY_AFTER_S)}) from exc
        raise ClientError(503, None, f"the cascade is unavailable: {exc}",
                          {"Retry-After": str(RETRY_AFTER_S)}) from exc
    except RayServeException as exc:
        raise ClientError(503, None, f"the cascade is unavailable: {type(exc).__name__}") from exc
    finally:
        if not handed_over:
            release()


async def _stream(
    service: MusicLMService, request: Request, spec: GenerationSpec, frames: int, deadline: float,
    headers: dict[str, str], release: Callable[[], None], arrived: float,
) -> Response:
    """A chunked WAV: the header (exact length: the plan's frames are known up front), then PCM as each
    window finishes. The first chunk is awaited before answering, so refusals before any audio keep
    their status; after that an error or a timeout ends the stream early (and is logged)."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=4)

    async def produce() -> None:
        try:
            async for emitted in service.run(spec):
                await queue.put(np.asarray(emitted["audio"], dtype=np.float32))
            await queue.put(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put(exc)
        finally:
            release()

    task = asyncio.create_task(produce())

    async def next_chunk() -> Any:
        try:
            item = await asyncio.wait_for(queue.get(), timeout=max(0.0, deadline - time.perf_counter()))
        except asyncio.TimeoutError as exc:
            task.cancel()
            raise ClientError(504, None, f"generation took longer than {service.config.request_timeout_s:g} s") from exc
        if isinstance(item, Exception):
            raise item
        return item

    try:
        first = await next_chunk()
    except BaseException:
        task.cancel()
        raise
    ttfa = time.perf_counter() - arrived
    request.state.ttfa_s = round(ttfa, 4)
    service.metrics.observe("ttfa", ttfa, request.url.path)
    channels = spec.num_samples
    request_id = request.state.request_id

    async def body() -> AsyncIterator[bytes]:
        sent = 0
        try:
            yield wav_header(frames, channels)
            chunk = first
            while chunk is not None:
                chunk = chunk[:, : frames - sent]
                sent += chunk.shape[1]
                yield pcm16(chunk)
                chunk = await next_chunk()
            if sent < frames:  # never expected: keep the header's promise
                logger.warning("musiclm.stream %s short by %d frames", request_id, frames - sent)
                yield pcm16(np.zeros((channels, frames - sent), dtype=np.float32))
            service.metrics.observe("generation", time.perf_counter() - arrived, request.url.path)
            service.metrics.observe("audio", frames / SAMPLE_RATE * channels)
        except Exception as exc:  # noqa: BLE001 - the status is sent: end the stream and say why in the log
            logger.warning("musiclm.stream %s ended early after %d frames: %s", request_id, sent, exc)
        finally:
            task.cancel()

    headers = {**headers, "X-Time-To-First-Audio": f"{ttfa:.4f}", "X-Stream": "chunked"}
    return StreamingResponse(body(), media_type="audio/wav", headers=headers)

# ----------------------------------------------------------------------------- the app


def create_app(service: MusicLMService) -> FastAPI:
    """The FastAPI app of one ingress: routes, JSON errors, request ids, structured logs, metrics."""
    config = service.config
    app = FastAPI(
        title="MusicLM",
        version="0.2.0",
        description="Text → music at 24 kHz (MusicLM cascade: MuLan → semantic → coarse → fine → SoundStream). "
        "Long pieces, story mode, N samples, top-k / top-p, guidance, re-ranking, melody conditioning, streaming.",
    )
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        described = describe_validation_error(list(exc.errors()))
        return error_response(422, described["field"], described["message"])

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        field = {404: "path", 405: "method"}.get(exc.status_code)
        message = {
            404: f"no route {request.url.path}; see /docs",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, field, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientError)
    async def _on_client_error(request: Request, exc: ClientError) -> JSONResponse:
        return error_response(exc.status, exc.field, exc.message, exc.headers)

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, None, f"internal error: {type(exc).__name__}")

    @app.middleware("http")
    async def _request_log(request: Request, call_next: Any) -> Response:
        """Request id in and out; one structured (JSON) log line and the request counter per request."""
        start = time.perf_counter()
        given = request.headers.get("x-request-id", "")
        serve_id = _serve_request_id()  # behind Serve's proxy: its id (the client's, or its own), echoed by it
        request.state.request_id = serve_id or (given if REQUEST_ID.match(given) else uuid.uuid4().hex)
        response = await call_next(request)
        if serve_id is None:
            response.headers["X-Request-Id"] = request.state.request_id
        route = request.url.path if request.url.path in ("/", "/health", "/generate", "/generate/melody") else "other"
        service.metrics.request(route, response.status_code)
        record = {
            "request_id": request.state.request_id,
            "method": request.method,
            "path": request.url.path,
            "status": response.status_code,
            "prompt_chars": getattr(request.state, "prompt_chars", None),
            "seconds": getattr(request.state, "seconds", None),
            "num_samples": getattr(request.state, "num_samples", None),
            "stream": getattr(request.state, "stream", None),
            "ttfa_s": getattr(request.state, "ttfa_s", None),
            "time_s": round(time.perf_counter() - start, 4),
        }
        logger.info("musiclm.request %s", json.dumps(record, sort_keys=True))
        return response

    def custom_openapi() -> dict[str, Any]:
        """FastAPI's schema plus the request model, which the routes validate themselves (to answer 400/415/422)."""
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        request_schema = request_json_schema(config.limits(), ref_template="#/components/schemas/{model}")
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(request_schema.pop("$defs", {}))
        schemas["GenerateRequest"] = request_schema
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi  # type: ignore[method-assign]

    @app.get("/", response_class=HTMLResponse, summary="The web page: prompt, story, melody, player, spectrogram")
    async def index() -> HTMLResponse:
        return HTMLResponse(_web_page())

    @app.post(
        "/generate",
        summary="Generate music from a text prompt or a story",
        response_class=Response,
        responses=_RESPONSES,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}},
            }
        },
    )
    async def generate(request: Request) -> Response:
        if _media_type(request) != "application/json":
            raise ClientError(
                415, "content-type", f"expected Content-Type application/json, got '{_media_type(request) or 'none'}'"
            )
        body = await _read_capped(request, config.max_body_bytes)
        if body is None:
            raise ClientError(413, "body", f"body is larger than {config.max_body_bytes} bytes")
        return await _respond(service, request, _parse(_json_body(body), config), None)

    @app.post(
        "/generate/melody",
        summary="Generate music from a prompt (or story) and a melody (hummed, whistled, played)",
        response_class=Response,
        responses=_RESPONSES,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["request", "melody"],
                            "properties": {
                                "request": {"type": "string", "description": "the GenerateRequest, as JSON text"},
                                "melody": {"type": "string", "format": "binary",
                                           "description": f"an audio file ({', '.join(config.upload_formats)})"},
                            },
                        }
                    }
                },
            }
        },
    )
    async def generate_melody(request: Request) -> Response:
        if _media_type(request) != "multipart/form-data":
            raise ClientError(
                415, "content-type", f"expected Content-Type multipart/form-data, got '{_media_type(request) or 'none'}'"
            )
        cap = config.max_upload_bytes + config.max_body_bytes
        body = await _read_capped(request, cap)
        if body is None:
            raise ClientError(413, "melody", f"upload is larger than {cap} bytes")

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=1, max_part_size=config.max_body_bytes)
        except Exception as exc:  # noqa: BLE001 - python-multipart's errors on hostile bodies
            raise ClientError(400, "body", f"malformed multipart body: {getattr(exc, 'detail', exc)}") from exc
        try:
            text, upload = form.get("request"), form.get("melody")
            if text is None:
                raise ClientError(422, "request", "field 'request' (the JSON request) is required")
            if not isinstance(text, str):
                raise ClientError(422, "request", "field 'request' must be JSON text, not a file")
            if upload is None or isinstance(upload, str):
                raise ClientError(422, "melody", "field 'melody' must be an uploaded audio file")
            parsed = _parse(_json_body(text.encode("utf-8", "surrogatepass"), "request"), config)
            wav = decode_upload(await upload.read(config.max_upload_bytes + 1), config)
        finally:
            await form.close()
        return await _respond(service, request, parsed, wav)

    @app.get("/health", summary="Which stages are loaded, from which checkpoints")
    async def health() -> JSONResponse:
        async def ask(name: str) -> tuple[str, dict[str, Any] | None]:
            try:
                return name, await asyncio.wait_for(service.handles[name].info.remote(), timeout=HEALTH_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - an unreachable stage is what health reports
                return name, None

        answers = dict(await asyncio.gather(*(ask(name) for name in MODEL_DEPLOYMENTS)))
        artifacts = {name: answer["artifacts"] for name, answer in answers.items() if answer}
        checkpoints = {folder: a["id"] for found in artifacts.values() for folder, a in found.items()}
        presets = sorted({a["preset"] for found in artifacts.values() for a in found.values() if "preset" in a})
        rates = next((a["rates"] for found in artifacts.values() for a in found.values() if "rates" in a), None)
        healthy = all(answer is not None for answer in answers.values())
        document = {
            "status": "ok" if healthy else "degraded",
            "stages": {name: answer is not None for name, answer in answers.items()},
            "preset": presets[0] if len(presets) == 1 else presets,
            "checkpoints": checkpoints,
            "token_rates": rates,
            "sample_rate": SAMPLE_RATE,
            "batching": {name: answer["batching"] for name, answer in answers.items() if answer},
            "queue": {"active": service.active, "max_queued_requests": config.max_queued_requests},
            "limits": {**config.limits(), "max_upload_bytes": config.max_upload_bytes,
                       "upload_formats": list(config.upload_formats)},
            "max_seconds": config.max_seconds,
            "max_prompt_chars": config.max_prompt_chars,
            "metrics_url": metrics_url(),
        }
        return JSONResponse(document, status_code=200 if healthy else 503)

    return app
