"""The finished cascade over HTTP: a Ray Serve application with one deployment per stage.

    POST /generate {"prompt", "seconds", "seed", "temperatures"}  ->  audio/wav (16-bit PCM, 24 kHz)

    Ingress ──▶ Conditioner (MuLan / CLAP text → M_T, 12 tokens)
            ──▶ SemanticStage (M_T → S, 25 Hz)
            ──▶ CoarseStage (M_T, S → A[:4], 50 Hz; EnCodec 75 Hz)
            ──▶ FineStage (M_T, A[:4] → A[:12]; EnCodec A[:8])
            ──▶ Codec (SoundStream / EnCodec decoder: A → 24 kHz audio)

The conditioner and the codec are the backends ``CKPT_DIR/backends.json`` chooses
(:mod:`musiclm.tokenizers.backends`); the stages use the token rates in their configs, and the
checkpoints are refused before anything starts when the stages' and the tokenizers' rates differ.

Each stage is its own deployment so that a cluster can give the heavy Transformers GPUs and
replicas of their own while the light parts share a CPU; on a laptop the fractional ``num_cpus``
of ``ServeConfig`` make all six fit two cores. Tensors cross deployments as numpy arrays. Every
request carries its seed to every stage, which seeds its own ``torch.Generator`` with
``cascade.stage_generator``: the same request gives the same bytes whichever replica serves it, and
the same audio as ``Cascade.generate`` in-process.

(No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` annotation
of the class-based routes that ``serve.ingress`` rewrites.)

Bad input is always a 4xx JSON ``{"error": {"field", "message"}}``; a generation that takes
too long answers 504, an overloaded or unavailable stage 503 — never a 500 for the client's input.
"""

import asyncio
import io
import json
import logging
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from musiclm.checkpoint import CheckpointError, artifact_id, read_artifact_config
from musiclm.constants import SAMPLE_RATE
from musiclm.generation.cascade import generate_coarse, generate_fine, generate_semantic, stage_generator
from musiclm.orchestration import ray_cluster
from musiclm.orchestration.schemas import (
    STAGES,
    GenerateRequest,
    ServeConfig,
    ValidationError,
    describe_validation_error,
    error_field,
    parse_generate_request,
)

logger = logging.getLogger("ray.serve")

# the artifact folders each deployment loads with our own tokenizers (kinds are the folder names, see
# docs/interfaces.md); ``components(checkpoints)`` gives those of the backends a folder chooses
COMPONENTS: dict[str, tuple[str, ...]] = {
    "conditioner": ("mulan", "mulan_rvq"),
    "semantic": ("semantic",),
    "coarse": ("coarse",),
    "fine": ("fine",),
    "codec": ("soundstream",),
}
HEALTH_TIMEOUT_S = 10.0


def components(checkpoints: str | Path) -> dict[str, tuple[str, ...]]:
    """The artifact folders each deployment loads for the backends of ``checkpoints/backends.json``:
    a pretrained conditioner needs only ``mulan_rvq/`` (our RVQ on its embeddings), a pretrained codec none."""
    from musiclm.tokenizers.backends import read_backends

    specs = read_backends(checkpoints)
    folders = dict(COMPONENTS)
    if specs["conditioner"].pretrained:
        folders["conditioner"] = ("mulan_rvq",)
    if specs["acoustic"].pretrained:
        folders["codec"] = ()
    return folders


# ----------------------------------------------------------------------------- checkpoints


def check_checkpoints(checkpoints: str | Path, preset: str | None = None) -> dict[str, dict[str, Any]]:
    """Check the system checkpoint folder before anything starts; one error line lists every problem.

    Returns ``{folder: config.json document}`` for the folders the cascade needs (six with our own
    tokenizers). The three stages must model the token rates the tokenizers make.
    """
    from musiclm.models.stages import as_rates, describe_rates
    from musiclm.tokenizers.backends import read_backends, token_rates

    root = Path(checkpoints)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist")
    try:
        specs = read_backends(root)
        needed = components(root)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    # a pretrained conditioner's RVQ was fitted on its embeddings: its preset is not the stages'
    preset_free = {"mulan_rvq"} if specs["conditioner"].pretrained else set()
    documents, problems = {}, []
    for folder in (name for names in needed.values() for name in names):
        path = root / folder
        if not (path / "config.json").is_file():
            problems.append(f"{folder}/config.json")
            continue
        try:
            document = read_artifact_config(path)
        except CheckpointError as exc:
            problems.append(f"{folder} ({exc})")
            continue
        if document["kind"] != folder:
            problems.append(f"{folder} (holds a '{document['kind']}' checkpoint)")
        elif preset is not None and folder not in preset_free and document["preset"] != preset:
            problems.append(f"{folder} (preset '{document['preset']}', expected '{preset}')")
        else:
            documents[folder] = document
    for spec in specs.values():
        if spec.pretrained and not Path(str(spec.path)).is_dir():
            problems.append(f"the {spec.backend} model folder {spec.path} named in backends.json")
    if problems:
        raise CheckpointError(f"checkpoint folder {root} is incomplete: missing or invalid {', '.join(problems)}")
    try:
        tokenizer_rates = token_rates(root)
        for stage in ("semantic", "coarse", "fine"):
            rates = as_rates(documents[stage]["config"].get("rates"))  # saved before rates were recorded: the paper's
            if rates != tokenizer_rates:
                problems.append(f"{stage} models tokens at {describe_rates(rates)}")
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint folder {root}: cannot read the token rates: {exc}") from exc
    if problems:
        raise CheckpointError(
            f"checkpoint folder {root}: the tokenizers make tokens at {describe_rates(tokenizer_rates)}, but "
            f"{'; '.join(problems)} (train the stages on shards of these tokenizers)"
        )
    return documents


# ----------------------------------------------------------------------------- model deployments
# Heavy imports happen in the replicas' constructors: the driver that builds the application
# never loads a model, and each replica imports only what it runs.


class _ModelReplica:
    """What every model deployment shares: torch threads, device, artifact ids, and one lock.

    Serve runs a replica's sync methods on a thread pool, but a stage Transformer keeps its KV cache
    on the module and a Hugging Face fast tokenizer refuses concurrent use ("Already borrowed"):
    a replica computes one request at a time (``max_ongoing_requests`` defaults to 1 as well, so
    that Serve's router rather than this lock spreads requests over replicas).
    """

    component: str = ""  # the key of ``components()``: which folders this deployment loads
    role: str | None = None  # the tokenizer role it runs (acoustic / conditioner), if any

    def __init__(self, checkpoints: str, preset: str | None, torch_threads: int | None, num_gpus: float) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.lock = threading.Lock()
        self.root = Path(checkpoints)
        self.folders = components(self.root)[self.component]
        self.artifacts: dict[str, dict[str, Any]] = {
            folder: {"id": artifact_id(self.root / folder), "preset": read_artifact_config(self.root / folder)["preset"]}
            for folder in self.folders
        }
        if self.role is not None:
            from musiclm.tokenizers.backends import read_backends

            spec = read_backends(self.root)[self.role]
            if spec.pretrained:  # named by its backend, without a preset
                from musiclm.tokenizers import pretrained

                self.artifacts[spec.backend] = {"id": str(pretrained.backend_info(spec).get("id"))}

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array, dtype=np.int64)).to(self.device)  # a writable copy

    def info(self) -> dict[str, dict[str, str]]:
        """``{folder: {"id", "preset"}}`` of the loaded artifacts, for ``GET /health``."""
        return self.artifacts


@serve.deployment
class Conditioner(_ModelReplica):
    """The conditioner's text tower + RVQ (MuLan, or the backend chosen): prompt → the 12 conditioning tokens M_T."""

    component, role = "conditioner", "conditioner"

    def __init__(self, checkpoints: str, preset: str | None, torch_threads: int | None, num_gpus: float) -> None:
        from musiclm.tokenizers.backends import load_conditioner

        super().__init__(checkpoints, preset, torch_threads, num_gpus)
        self.conditioner = load_conditioner(self.root, preset=preset, device=self.device)

    @torch.inference_mode()
    def tokens(self, prompt: str) -> np.ndarray:
        with self.lock:
            return self.conditioner.tokens_text([prompt]).cpu().numpy()  # [1, 12]


class _Stage(_ModelReplica):
    """A Transformer stage of the cascade: loads ``<checkpoints>/<stage>`` and samples from it."""

    stage: str = ""

    def __init__(self, checkpoints: str, preset: str | None, torch_threads: int | None, num_gpus: float) -> None:
        from musiclm.training.stage_learner import load_stage

        self.component = self.stage
        super().__init__(checkpoints, preset, torch_threads, num_gpus)
        self.model, self.config = load_stage(self.root / self.stage, stage=self.stage, preset=preset)
        self.model.to(self.device)
        self.artifacts[self.stage]["rates"] = self.config.rates.to_dict()


@serve.deployment
class SemanticStage(_Stage):
    """p(S | M_T): ``seconds`` of semantic tokens at 25 Hz (at least one frame)."""

    stage = "semantic"

    @torch.inference_mode()
    def generate(self, mulan_tokens: np.ndarray, seconds: float, temperature: float, seed: int) -> np.ndarray:
        # the stages work in whole semantic frames: at least one (the ingress trims the audio afterwards)
        seconds = max(seconds, 1.0 / self.config.rates.semantic_frame_rate)
        with self.lock:
            generator = stage_generator(seed, self.stage, self.device)
            semantic = generate_semantic(
                self.model, self.config, self._tensor(mulan_tokens), seconds, temperature, generator
            )
        return semantic.cpu().numpy()  # [1, Fs]


@serve.deployment
class CoarseStage(_Stage):
    """p(A[:Kc] | S, M_T): the coarse levels (the first four) at the acoustic rate (50 Hz; EnCodec 75 Hz)."""

    stage = "coarse"

    @torch.inference_mode()
    def generate(self, mulan_tokens: np.ndarray, semantic: np.ndarray, temperature: float, seed: int) -> np.ndarray:
        with self.lock:
            generator = stage_generator(seed, self.stage, self.device)
            coarse = generate_coarse(
                self.model, self.config, self._tensor(mulan_tokens), self._tensor(semantic), temperature, generator
            )
        return coarse.cpu().numpy()  # [1, Kc, Fa]


@serve.deployment
class FineStage(_Stage):
    """p(A[Kc:] | A[:Kc], M_T): the remaining levels (eight for SoundStream, four for EnCodec at 6 kbps)."""

    stage = "fine"

    @torch.inference_mode()
    def generate(self, mulan_tokens: np.ndarray, coarse: np.ndarray, temperature: float, seed: int) -> np.ndarray:
        with self.lock:
            generator = stage_generator(seed, self.stage, self.device)
            fine = generate_fine(
                self.model, self.config, self._tensor(mulan_tokens), self._tensor(coarse), temperature, generator
            )
        return fine.cpu().numpy()  # [1, K, Fa]


@serve.deployment
class Codec(_ModelReplica):
    """The acoustic tokenizer's decoder (SoundStream, or the backend chosen): acoustic tokens → 24 kHz audio."""

    component, role = "codec", "acoustic"

    def __init__(self, checkpoints: str, preset: str | None, torch_threads: int | None, num_gpus: float) -> None:
        from musiclm.tokenizers.backends import load_acoustic

        super().__init__(checkpoints, preset, torch_threads, num_gpus)
        self.codec = load_acoustic(self.root, preset=preset, device=self.device)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        with self.lock:
            wav = self.codec.decode(self._tensor(codes))  # [1, F * hop]
        return wav[0].float().cpu().numpy()  # [T]


# ----------------------------------------------------------------------------- HTTP layer


def error_response(status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one shape of every error answer: ``{"error": {"field": ..., "message": ...}}``."""
    return JSONResponse({"error": {"field": field, "message": message}}, status_code=status, headers=headers)


def encode_wav(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """float32 [T] in [-1, 1] → the bytes of a 16-bit PCM WAV file."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(np.nan_to_num(wav), -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


app = FastAPI(
    title="MusicLM",
    version="0.1.0",
    description="Text → music at 24 kHz (MusicLM cascade: MuLan → semantic → coarse → fine → SoundStream).",
)


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


@app.exception_handler(Exception)
async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, None, f"internal error: {type(exc).__name__}")


@app.middleware("http")
async def _log_request(request: Request, call_next: Any) -> Response:
    """One structured (JSON) log line per request."""
    start = time.perf_counter()
    request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    response = await call_next(request)
    record = {
        "request_id": request.state.request_id,
        "method": request.method,
        "path": request.url.path,
        "status": response.status_code,
        "prompt_chars": getattr(request.state, "prompt_chars", None),
        "seconds": getattr(request.state, "seconds", None),
        "time_s": round(time.perf_counter() - start, 4),
    }
    logger.info("musiclm.request %s", json.dumps(record, sort_keys=True))
    return response


def _custom_openapi() -> dict[str, Any]:
    """FastAPI's schema plus the request model, which the route validates itself (to answer 400/415/422)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    request_schema = GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(request_schema.pop("$defs", {}))
    components["GenerateRequest"] = request_schema
    app.openapi_schema = schema
    return schema


app.openapi = _custom_openapi  # type: ignore[method-assign]

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


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP front: validates the request, then walks it through the stage deployments."""

    def __init__(
        self,
        conditioner: DeploymentHandle,
        semantic: DeploymentHandle,
        coarse: DeploymentHandle,
        fine: DeploymentHandle,
        codec: DeploymentHandle,
        config: dict[str, Any],
    ) -> None:
        self.handles = {
            "conditioner": conditioner,
            "semantic": semantic,
            "coarse": coarse,
            "fine": fine,
            "codec": codec,
        }
        self.config = ServeConfig(**config)

    async def _cascade(self, request: GenerateRequest) -> np.ndarray:
        temperatures = request.resolved_temperatures()
        mulan = await self.handles["conditioner"].tokens.remote(request.prompt)
        # the semantic stage generates at least one frame; the audio is trimmed to the request below
        semantic = await self.handles["semantic"].generate.remote(
            mulan, request.seconds, temperatures["semantic"], request.seed
        )
        coarse = await self.handles["coarse"].generate.remote(mulan, semantic, temperatures["coarse"], request.seed)
        fine = await self.handles["fine"].generate.remote(mulan, coarse, temperatures["fine"], request.seed)
        wav = await self.handles["codec"].decode.remote(fine)
        return wav[: int(round(request.seconds * SAMPLE_RATE))]

    @app.post(
        "/generate",
        summary="Generate music from a text prompt",
        response_class=Response,
        responses={
            200: {"content": {"audio/wav": {}}, "description": "16-bit PCM WAV, mono, 24 kHz"},
            400: {"description": "malformed JSON", "content": _ERROR_SCHEMA},
            413: {"description": "body too large", "content": _ERROR_SCHEMA},
            415: {"description": "not application/json", "content": _ERROR_SCHEMA},
            422: {"description": "invalid field (named in error.field)", "content": _ERROR_SCHEMA},
            503: {"description": "a stage is unavailable or overloaded", "content": _ERROR_SCHEMA},
            504: {"description": "generation timed out", "content": _ERROR_SCHEMA},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}},
            }
        },
    )
    async def generate(self, request: Request) -> Response:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return error_response(
                415, "content-type", f"expected Content-Type application/json, got '{media_type or 'none'}'"
            )
        body = await request.body()
        if len(body) > self.config.max_body_bytes:
            return error_response(413, "body", f"body has {len(body)} bytes; at most {self.config.max_body_bytes}")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return error_response(400, "body", f"malformed JSON: {exc}")
        try:
            parsed = parse_generate_request(
                data, max_seconds=self.config.max_seconds, max_prompt_chars=self.config.max_prompt_chars
            )
        except ValidationError as exc:
            described = describe_validation_error(exc.errors())
            return error_response(422, described["field"], described["message"])
        request.state.prompt_chars = len(parsed.prompt)
        request.state.seconds = parsed.seconds

        start = time.perf_counter()
        try:
            wav = await asyncio.wait_for(self._cascade(parsed), timeout=self.config.request_timeout_s)
        except asyncio.TimeoutError:
            return error_response(
                504, None, f"generation took longer than {self.config.request_timeout_s:g} s", {"Retry-After": "30"}
            )
        except (BackPressureError, DeploymentUnavailableError) as exc:
            return error_response(503, None, f"the cascade is overloaded or unavailable: {exc}", {"Retry-After": "5"})
        except RayServeException as exc:
            return error_response(503, None, f"the cascade is unavailable: {type(exc).__name__}")
        elapsed = time.perf_counter() - start
        return Response(
            content=encode_wav(wav),
            media_type="audio/wav",
            headers={
                "X-Seconds": f"{len(wav) / SAMPLE_RATE:.6f}",
                "X-Seed": str(parsed.seed),
                "X-Generation-Time": f"{elapsed:.4f}",
            },
        )

    @app.get("/health", summary="Which stages are loaded, from which checkpoints")
    async def health(self) -> JSONResponse:
        async def ask(name: str) -> tuple[str, dict[str, Any] | None]:
            try:
                return name, await asyncio.wait_for(self.handles[name].info.remote(), timeout=HEALTH_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - an unreachable stage is what health reports
                return name, None

        answers = dict(await asyncio.gather(*(ask(name) for name in self.handles)))
        checkpoints = {folder: a["id"] for answer in answers.values() if answer for folder, a in answer.items()}
        presets = sorted({a["preset"] for answer in answers.values() if answer for a in answer.values() if "preset" in a})
        rates = next((a["rates"] for answer in answers.values() if answer for a in answer.values() if "rates" in a), None)
        healthy = all(answer is not None for answer in answers.values())
        document = {
            "status": "ok" if healthy else "degraded",
            "stages": {name: answer is not None for name, answer in answers.items()},
            "preset": presets[0] if len(presets) == 1 else presets,
            "checkpoints": checkpoints,
            "token_rates": rates,
            "sample_rate": SAMPLE_RATE,
            "max_seconds": self.config.max_seconds,
            "max_prompt_chars": self.config.max_prompt_chars,
        }
        return JSONResponse(document, status_code=200 if healthy else 503)


# ----------------------------------------------------------------------------- application


def build_app(config: ServeConfig) -> serve.Application:
    """The bound application: five model deployments and the ingress that composes their handles."""

    def options(name: str, max_ongoing: int) -> dict[str, Any]:
        return {
            "num_replicas": config.num_replicas[name],
            "max_ongoing_requests": max_ongoing,
            "ray_actor_options": {"num_cpus": config.num_cpus[name], "num_gpus": config.num_gpus[name]},
        }

    checkpoints = str(Path(config.checkpoints).resolve())

    def bind(deployment: serve.Deployment, name: str) -> serve.Application:
        args = (checkpoints, config.preset, config.torch_threads, config.num_gpus[name])
        return deployment.options(**options(name, config.max_ongoing_requests)).bind(*args)

    conditioner = bind(Conditioner, "conditioner")
    semantic = bind(SemanticStage, "semantic")
    coarse = bind(CoarseStage, "coarse")
    fine = bind(FineStage, "fine")
    codec = bind(Codec, "codec")
    ingress_options = options("ingress", config.ingress_max_ongoing_requests)
    ingress_options["max_queued_requests"] = config.max_queued_requests
    return Ingress.options(**ingress_options).bind(conditioner, semantic, coarse, fine, codec, config.to_dict())


def run_server(config: ServeConfig, blocking: bool = True) -> str:
    """Check the checkpoints, start Serve on ``host:port``, deploy, and (if ``blocking``) serve until Ctrl-C.

    Returns the base URL. Non-blocking, Serve keeps running until ``serve.shutdown()``.
    """
    check_checkpoints(config.checkpoints, config.preset)
    started_ray = not ray_cluster.is_connected()
    ray_cluster.connect(config.address)
    serve.start(
        http_options={
            "host": config.host,
            "port": config.port,
            # a backstop behind the ingress's own timeout (which answers a JSON 504 first)
            "request_timeout_s": config.request_timeout_s + 30.0,
        }
    )
    serve.run(build_app(config), name=config.app_name, route_prefix="/")
    url = f"http://{config.host}:{config.port}"
    logger.warning("musiclm is serving on %s (docs at %s/docs)", url, url)
    if not blocking:
        return url

    print(f"musiclm: serving on {url}  (OpenAPI docs: {url}/docs; Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("musiclm: shutting down", flush=True)
        serve.shutdown()
        if started_ray:
            ray_cluster.shutdown()
    return url


__all__ = [
    "COMPONENTS",
    "CoarseStage",
    "Codec",
    "Conditioner",
    "FineStage",
    "Ingress",
    "SemanticStage",
    "ServeConfig",
    "app",
    "build_app",
    "check_checkpoints",
    "components",
    "encode_wav",
    "error_field",
    "run_server",
    "STAGES",
]
