"""The finished cascade over HTTP: a Ray Serve application with one deployment per stage.

    GET  /                  a small web page (prompt, duration, story editor, melody upload, player, spectrogram)
    GET  /health            which stages are loaded, from which checkpoints; batching counts; the metrics URL
    POST /generate          JSON (schemas.GenerateRequest) -> audio/wav, 16-bit PCM, 24 kHz, one channel per sample
    POST /generate/melody   multipart: ``request`` (that JSON) + ``melody`` (an audio file) -> the same

    Ingress ──▶ Conditioner (MuLan / CLAP text → M_T; melody tokens; MuLan scores for re-ranking)
            ──▶ SemanticStage ──▶ CoarseStage ──▶ FineStage   (one window of one stage per call)
            ──▶ Codec (acoustic tokens → 24 kHz audio)

The ingress does not know the algorithm: it *executes* :func:`musiclm.generation.plan.plan_steps`,
the generator that the in-process ``Cascade.stream`` executes too, sending each ``Call`` to the
deployment of its kind and the result back. A stage call for N samples becomes N single-row
calls; each stage method is a ``@serve.batch`` handler, so rows of concurrent requests (and the N
rows of one request) share forward passes. A batch is grouped by compatible shapes (same window,
same sampling settings) and each row draws from its own ``row_generator(seed, row, stage, window)``:
a request's audio does not depend on which other requests shared its batches.

Each stage is its own deployment so that a cluster can give the heavy Transformers GPUs and
replicas (or autoscaling) of their own while the light parts share a CPU; ``ServeConfig``
(``examples/serve.yaml``) sets all of it. Tensors cross deployments as numpy arrays.

Protection: every 4xx is JSON ``{"error": {"field", "message"}}``; an ingress replica holds at most
``max_queued_requests`` generations and answers 429 (``Retry-After``) beyond that, as it does when a
stage's queue rejects a call (Serve's ``BackPressureError``); a generation that takes longer than
``request_timeout_s`` answers 504. Every request has an id (``X-Request-Id`` in, or a new one; always
out) that the one JSON log line per request carries. Metrics (``ray.util.metrics``) go to Ray's
Prometheus endpoint with Ray Serve's own (``GET /health`` names its URL).

The codec decodes each new chunk together with the left context the plan gives, statelessly (its
replicas need no per-request state); the overlap join of :class:`~musiclm.generation.windows.ChunkDecoder`
runs in the ingress on the decoded audio.

(No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` annotations.)
"""

import asyncio
import io
import json
import logging
import re
import signal
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException

from musiclm.checkpoint import CheckpointError, artifact_id, read_artifact_config
from musiclm.constants import SAMPLE_RATE
from musiclm.generation.plan import Call, plan_steps, segment_edges
from musiclm.generation.spec import GenerationSpec, Segment
from musiclm.generation.windows import ChunkDecoder
from musiclm.orchestration import ray_cluster
from musiclm.orchestration.schemas import (
    STAGES,
    GenerateRequest,
    ValidationError,
    describe_validation_error,
    error_field,
    request_json_schema,
)
from musiclm.orchestration.serve_config import BATCHES_IN_FLIGHT, MODEL_DEPLOYMENTS, ServeConfig

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
RETRY_AFTER_S = 5
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ROW_KEYS = ("mulan", "melody", "prefix", "semantic", "coarse")  # per-row arrays of a stage call


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


# ----------------------------------------------------------------------------- metrics


class _Metrics:
    """Our counters and histograms through ``ray.util.metrics`` (exported on Ray's Prometheus endpoint with
    Ray Serve's own, names prefixed ``ray_``); without Ray (the in-process app) they only count locally."""

    LATENCY_BOUNDS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self._ray: dict[str, Any] = {}
        try:
            import ray

            if ray.is_initialized():
                from ray.util import metrics

                self._ray = {
                    "requests": metrics.Counter(
                        "musiclm_requests_total", "HTTP requests by route and status", tag_keys=("route", "status")
                    ),
                    "generation": metrics.Histogram(
                        "musiclm_generation_seconds", "Wall time of a whole generation",
                        boundaries=self.LATENCY_BOUNDS, tag_keys=("route",),
                    ),
                    "ttfa": metrics.Histogram(
                        "musiclm_time_to_first_audio_seconds", "Request arrival to the first audio chunk (streaming)",
                        boundaries=self.LATENCY_BOUNDS, tag_keys=("route",),
                    ),
                    "audio": metrics.Counter("musiclm_audio_seconds_total", "Seconds of audio generated"),
                }
        except Exception:  # noqa: BLE001 - metrics must never break serving
            self._ray = {}

    def request(self, route: str, status: int) -> None:
        key = (route, str(status))
        self.counts[key] = self.counts.get(key, 0) + 1
        if "requests" in self._ray:
            self._ray["requests"].inc(1, tags={"route": route, "status": str(status)})

    def observe(self, name: str, value: float, route: str | None = None) -> None:
        metric = self._ray.get(name)
        if metric is None:
            return
        tags = {"route": route} if route is not None else None
        if name == "audio":
            metric.inc(value)
        else:
            metric.observe(value, tags=tags)


def metrics_url() -> str | None:
    """Where Prometheus scrapes this node's Ray metrics (ours and Ray Serve's), or None without Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        here = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == here and node.get("MetricsExportPort"):
                return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    except Exception:  # noqa: BLE001 - best effort, for /health
        return None
    return None


# ----------------------------------------------------------------------------- model deployments
# Heavy imports happen in the replicas' constructors: the driver that builds the application
# never loads a model, and each replica imports only what it runs.


def _group_key(row: dict[str, Any]) -> tuple:
    """Rows that can share one forward pass: same keys, same array shapes, same other values."""
    key = []
    for name in sorted(row):
        value = row[name]
        if name == "seeds":
            continue
        if isinstance(value, np.ndarray):
            key.append((name, "array", value.shape[1:]))
        else:
            key.append((name, "value", value if _hashable(value) else repr(value)))
    return tuple(key)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def group_rows(rows: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Indices of ``rows`` grouped by :func:`_group_key`, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(_group_key(row), []).append(i)
    return list(groups.values())


def stack_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One call's kwargs from rows of one group: arrays concatenated on the row axis, seeds joined."""
    first = rows[0]
    out: dict[str, Any] = {}
    for name, value in first.items():
        if isinstance(value, np.ndarray):
            out[name] = np.concatenate([row[name] for row in rows], axis=0)
        elif name == "seeds":
            out[name] = [seed for row in rows for seed in row[name]]
        else:
            out[name] = value
    return out


class _Coalescer:
    """One model computation at a time, over every row waiting when the model frees up (at most ``max_rows``).

    ``serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first call *even while the model is
    busy*; those batches would then wait in line one by one, each small. Here the batches Serve hands over
    (up to ``BATCHES_IN_FLIGHT`` at once) wait for the model together and are computed as one.
    """

    def __init__(self, run: Callable[[list[Any]], list[Any]], max_rows: int) -> None:
        self.run, self.max_rows = run, max_rows
        self.pending: list[tuple[list[Any], asyncio.Future]] = []
        self.lock: asyncio.Lock | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, rows: list[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # a new event loop (the in-process app under a new test client)
            self.loop, self.lock, self.pending = loop, asyncio.Lock(), []
        future = loop.create_future()
        self.pending.append((rows, future))
        while not future.done():
            async with self.lock:
                if future.done():
                    break
                taken, size = [], 0
                while self.pending and (not taken or size + len(self.pending[0][0]) <= self.max_rows):
                    taken.append(self.pending.pop(0))
                    size += len(taken[-1][0])
                try:
                    results = await asyncio.to_thread(self.run, [row for part, _ in taken for row in part])
                except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                    for _, waiting in taken:
                        if not waiting.done():
                            waiting.set_exception(exc)
                    continue
                start = 0
                for part, waiting in taken:
                    if not waiting.done():
                        waiting.set_result(results[start : start + len(part)])
                    start += len(part)
        return await future


class _MicroBatcher:
    """``serve.batch``'s behaviour outside a Serve replica (which it refuses): calls that arrive within
    ``wait_s`` of the first, up to ``max_batch_size``, run as one batch; one batch at a time."""

    def __init__(self, handle: Callable[[list[Any]], Any], max_batch_size: int, wait_s: float) -> None:
        self.handle, self.max_batch_size, self.wait_s = handle, max_batch_size, wait_s
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.worker: asyncio.Task | None = None

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self.worker is not None and self.worker.get_loop() is not loop:  # a new event loop (a new test client)
            self.worker, self.pending = None, []
        future = loop.create_future()
        self.pending.append((item, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._work())
        return await future

    async def _work(self) -> None:
        while self.pending:
            deadline = time.perf_counter() + self.wait_s
            while len(self.pending) < self.max_batch_size and time.perf_counter() < deadline:
                await asyncio.sleep(min(0.001, self.wait_s))
            batch, self.pending = self.pending[: self.max_batch_size], self.pending[self.max_batch_size :]
            try:
                results = await self.handle([item for item, _ in batch])
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)


class _ModelReplica:
    """What every model deployment shares: torch threads, device, artifact ids, batching and one lock.

    A batched method is ``serve.batch`` applied per instance (so the batch size and wait come from
    the config, and each instance has its own queue), over a :class:`_Coalescer` that merges the
    batches queued while the model was busy. A batch runs in a worker thread so the replica's event
    loop keeps queueing meanwhile; the lock serialises the model (a stage keeps its KV cache on the
    module, and a Hugging Face fast tokenizer refuses concurrent use).
    """

    component: str = ""  # the key of ``components()``: which folders this deployment loads
    role: str | None = None  # the tokenizer role it runs (acoustic / conditioner), if any

    def __init__(self, checkpoints: str, config: dict[str, Any], name: str) -> None:
        self.settings = ServeConfig(**config)
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        num_gpus = self.settings.num_gpus[name]
        self.device = torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.lock = threading.Lock()
        self.name = name
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
        self.batch_counts = {"batches": 0, "rows": 0, "groups": 0, "largest": 0}
        self._batch_metric = None
        try:
            import ray

            if ray.is_initialized():
                from ray.util import metrics

                self._batch_metric = metrics.Histogram(
                    "musiclm_batch_rows", "Rows per batched call of a deployment",
                    boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("deployment",),
                )
        except Exception:  # noqa: BLE001 - metrics must never break serving
            self._batch_metric = None

    def batched(self, compute: Callable[[list[dict[str, Any]]], list[Any]]) -> Callable[..., Any]:
        """``compute(rows) -> results`` as a ``@serve.batch`` handler taking one row per call."""
        size, wait = self.settings.max_batch_size[self.name], self.settings.batch_wait_timeout_s[self.name]
        coalescer = _Coalescer(lambda rows: self._run_batch(compute, rows), size)

        async def handle(rows: list[dict[str, Any]]) -> list[Any]:
            return await coalescer(rows)

        try:
            serve.get_replica_context()
        except RayServeException:  # in process (build_local_app): serve.batch needs a replica
            return _MicroBatcher(handle, size, wait)
        return serve.batch(max_batch_size=size, batch_wait_timeout_s=wait, max_concurrent_batches=BATCHES_IN_FLIGHT)(
            handle
        )

    def _run_batch(self, compute: Callable[[list[dict[str, Any]]], list[Any]], rows: list[dict[str, Any]]) -> list[Any]:
        results: list[Any] = [None] * len(rows)
        groups = group_rows(rows)
        with self.lock, torch.inference_mode():
            for members in groups:
                for i, result in zip(members, compute([rows[i] for i in members])):
                    results[i] = result
        counts = self.batch_counts
        counts["batches"] += 1
        counts["rows"] += len(rows)
        counts["groups"] += len(groups)
        counts["largest"] = max(counts["largest"], max(len(m) for m in groups))
        if self._batch_metric is not None:
            self._batch_metric.observe(len(rows), tags={"deployment": self.name})
        return results

    def info(self) -> dict[str, Any]:
        """Loaded artifacts ``{folder: {"id", "preset"}}`` and batching counts, for ``GET /health``."""
        return {"artifacts": self.artifacts, "batching": dict(self.batch_counts)}


@serve.deployment
class Conditioner(_ModelReplica):
    """The conditioner (MuLan, or the backend chosen): prompt → M_T; audio + prompt → MuLan score (re-ranking);
    and, when the checkpoint folder has one, the melody tokenizer: melody audio → melody tokens."""

    component, role = "conditioner", "conditioner"

    def __init__(self, checkpoints: str, config: dict[str, Any]) -> None:
        from musiclm.tokenizers.backends import load_conditioner
        from musiclm.tokenizers.melody import has_melody, load_melody_tokenizer

        super().__init__(checkpoints, config, "conditioner")
        self.conditioner = load_conditioner(self.root, preset=self.settings.preset, device=self.device)
        self.melody = None
        if has_melody(self.root):
            self.melody = load_melody_tokenizer(self.root, preset=self.settings.preset, device=self.device)
            for folder in ("melody", "melody_rvq"):
                self.artifacts[folder] = {"id": artifact_id(self.root / folder),
                                          "preset": read_artifact_config(self.root / folder)["preset"]}
        self.tokens = self.batched(self._tokens)
        self.score = self.batched(self._score)
        self.melody_tokens = self.batched(self._melody_tokens)

    def _tokens(self, rows: list[dict[str, Any]]) -> list[np.ndarray]:
        # one prompt at a time: a padded batch of texts changes the embeddings in the last bits, which
        # may flip an RVQ code, and the conditioner is cheap next to the stages
        return [self.conditioner.tokens_text([row["prompt"]]).cpu().numpy() for row in rows]  # [1, Qm] each

    def _score(self, rows: list[dict[str, Any]]) -> list[np.ndarray]:
        audio = torch.as_tensor(np.concatenate([row["audio"] for row in rows]), dtype=torch.float32, device=self.device)
        a = torch.nn.functional.normalize(self.conditioner.embed_audio(audio).float(), dim=-1)  # [B, D]
        t = torch.nn.functional.normalize(self.conditioner.embed_text([rows[0]["prompt"]]).float(), dim=-1)  # [1, D]
        return list((a @ t.T)[:, 0].cpu().numpy().reshape(-1, 1))  # [B] -> B x [1]

    def _melody_tokens(self, rows: list[dict[str, Any]]) -> list[np.ndarray]:
        if self.melody is None:
            raise ValueError("this server's checkpoints have no melody tokenizer (melody/ and melody_rvq/)")
        return [self.melody.tokens(torch.as_tensor(row["audio"], device=self.device)).cpu().numpy() for row in rows]

    def capabilities(self) -> dict[str, bool]:
        return {
            "melody": self.melody is not None,
            "score": callable(getattr(self.conditioner, "embed_audio", None))
            and callable(getattr(self.conditioner, "embed_text", None)),
        }


class _Stage(_ModelReplica):
    """A Transformer stage of the cascade: loads ``<checkpoints>/<stage>`` and runs windows of it, batched."""

    stage: str = ""

    def __init__(self, checkpoints: str, config: dict[str, Any]) -> None:
        from musiclm.generation import windows
        from musiclm.training.stage_learner import load_stage

        self.component = self.stage
        super().__init__(checkpoints, config, self.stage)
        self.model, self.config = load_stage(self.root / self.stage, stage=self.stage, preset=self.settings.preset)
        self.model.to(self.device)
        self.artifacts[self.stage]["rates"] = self.config.rates.to_dict()
        self.window = {"semantic": windows.semantic_window, "coarse": windows.coarse_window,
                       "fine": windows.fine_window}[self.stage]
        self.generate = self.batched(self._generate)

    def _generate(self, rows: list[dict[str, Any]]) -> list[np.ndarray]:
        """Rows of one group -> one window call with B rows -> B results [1, ...]."""
        out = np.asarray(self.window(self.model, self.config, **stack_rows(rows)))
        return list(np.split(out, len(rows), axis=0))

    def stage_config(self) -> Any:
        """This stage's ``StageConfig`` (crop, rates, melody): what ``plan_steps`` schedules windows with."""
        return self.config


@serve.deployment
class SemanticStage(_Stage):
    """p(S | M_T): a window of semantic tokens at 25 Hz continuing its prefix."""

    stage = "semantic"


@serve.deployment
class CoarseStage(_Stage):
    """p(A[:Kc] | S, M_T): a window of the coarse levels (the first four) at the acoustic rate."""

    stage = "coarse"


@serve.deployment
class FineStage(_Stage):
    """p(A[Kc:] | A[:Kc], M_T): a window of the remaining levels."""

    stage = "fine"


@serve.deployment
class Codec(_ModelReplica):
    """The acoustic tokenizer's decoder (SoundStream, or the backend chosen): acoustic codes → 24 kHz audio.

    Stateless: each call decodes the codes it is given (the ingress prepends the left context). Calls are
    batched like the stages' but decoded row by row (see ``_decode``)."""

    component, role = "codec", "acoustic"

    def __init__(self, checkpoints: str, config: dict[str, Any]) -> None:
        from musiclm.tokenizers.backends import load_acoustic

        super().__init__(checkpoints, config, "codec")
        self.codec = load_acoustic(self.root, preset=self.settings.preset, device=self.device)
        self.decode = self.batched(self._decode)

    def _decode(self, rows: list[dict[str, Any]]) -> list[np.ndarray]:
        # row by row: a convolution's rounding depends on the batch size, and a row's audio must not depend
        # on which requests share the batch (the decoder is cheap next to the stages)
        out = []
        for row in rows:
            codes = torch.as_tensor(row["codes"], dtype=torch.long, device=self.device)  # [1, K, F]
            wav = torch.as_tensor(self.codec.decode(codes)).float().reshape(1, -1)  # [1, F * hop]
            out.append(wav.cpu().numpy())
        return out


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


# ----------------------------------------------------------------------------- the executor


class ClientError(Exception):
    """A request the server refuses: answered as a JSON 4xx naming the field."""

    def __init__(self, status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers


class _DecodedAudio:
    """A 'codec' whose ``decode`` returns audio the Codec deployment already decoded: lets the ingress
    run :class:`ChunkDecoder`'s overlap join (stateful, per request) without holding a codec."""

    def __init__(self) -> None:
        self.audio: np.ndarray | None = None  # [N, T] of one decode call
        self.cursor = 0  # rows handed out (the decoder may ask for all rows at once or one by one)

    def set(self, audio: np.ndarray) -> None:
        self.audio, self.cursor = audio, 0

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        rows = codes.shape[0]
        if self.audio is None or self.cursor + rows > self.audio.shape[0]:
            raise RuntimeError("decode called without the matching decoded audio")
        part = self.audio[self.cursor : self.cursor + rows]
        self.cursor += rows
        return torch.from_numpy(np.ascontiguousarray(part))


def _rows(kwargs: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """A stage call for N rows -> N single-row calls (arrays sliced on the row axis, one seed each)."""
    rows = []
    for i in range(n):
        row = {}
        for name, value in kwargs.items():
            if name in ROW_KEYS and value is not None:
                row[name] = np.ascontiguousarray(np.asarray(value)[i : i + 1])
            elif name == "seeds":
                row[name] = [tuple(int(v) for v in value[i])]
            else:
                row[name] = value
        rows.append(row)
    return rows


class MusicLMService:
    """Validates requests and executes their plans with deployment handles (or local stand-ins).

    ``handles``: name → an object with ``method.remote(...)`` returning an awaitable, for the five model
    deployments (Serve's ``DeploymentHandle``, or :class:`LocalHandle` in process).
    """

    def __init__(self, handles: dict[str, Any], config: ServeConfig) -> None:
        missing = set(MODEL_DEPLOYMENTS) - set(handles)
        if missing:
            raise ValueError(f"MusicLMService needs handles for {sorted(missing)}")
        self.handles = handles
        self.config = config
        self.active = 0  # generations admitted and not finished (this replica)
        self.metrics = _Metrics()
        self._configs: dict[str, Any] | None = None
        self._capabilities: dict[str, bool] | None = None

    # ---- what the stages are

    async def stage_configs(self) -> dict[str, Any]:
        if self._configs is None:
            found = await asyncio.gather(*(self.handles[s].stage_config.remote() for s in STAGES))
            self._configs = dict(zip(STAGES, found))
        return self._configs

    async def capabilities(self) -> dict[str, bool]:
        if self._capabilities is None:
            self._capabilities = await self.handles["conditioner"].capabilities.remote()
        return self._capabilities

    # ---- requests -> specs

    async def spec(self, request: GenerateRequest, melody_tokens: np.ndarray | None = None) -> GenerationSpec:
        """The plan's spec for a validated request; a ClientError for what only the models can refuse."""
        configs = await self.stage_configs()
        segments = tuple(Segment(prompt, seconds) for prompt, seconds in request.segments)
        try:
            spec = GenerationSpec(
                segments=segments, seed=request.seed, num_samples=request.num_samples,
                temperatures=request.temperatures.model_dump(exclude_none=True) if request.temperatures else None,
                top_k=request.top_k, top_p=request.top_p, guidance_scale=request.guidance_scale,
                melody_tokens=melody_tokens, rerank=request.rerank,
            )
        except ValueError as exc:
            raise ClientError(422, None, str(exc)) from exc
        try:
            segment_edges(spec, configs["semantic"].rates.semantic_frame_rate)
        except ValueError as exc:
            raise ClientError(422, "story" if request.story is not None else "seconds", str(exc)) from exc
        if request.rerank and not (await self.capabilities())["score"]:
            raise ClientError(422, "rerank", "re-ranking needs a conditioner with an audio and a text tower")
        if request.guidance_scale != 1.0 and not all(hasattr(c.layout, "null") for c in configs.values()):
            raise ClientError(422, "guidance_scale", "these stages have no null id: they cannot be guided")
        try:  # what plan_steps checks before its first call (melody against the stages, configs)
            next(plan_steps(spec, configs))
        except ValueError as exc:
            raise ClientError(422, "melody" if melody_tokens is not None else None, str(exc)) from exc
        return spec

    def total_frames(self, spec: GenerationSpec, configs: dict[str, Any]) -> int:
        """Audio frames per channel the plan produces (whole 40-ms semantic frames)."""
        rate = configs["semantic"].rates.semantic_frame_rate
        return segment_edges(spec, rate)[-1] * SAMPLE_RATE // rate

    async def melody_tokens(self, wav: np.ndarray) -> np.ndarray:
        if not (await self.capabilities())["melody"]:
            raise ClientError(
                422, "melody", "this server's checkpoints have no melody tokenizer (melody/ and melody_rvq/)"
            )
        tokens = await self.handles["conditioner"].melody_tokens.remote({"audio": wav[None].astype(np.float32)})
        return np.asarray(tokens)[0]  # [1, Fm, Q] -> [Fm, Q]

    # ---- admission

    def admit(self) -> None:
        if self.active >= self.config.max_queued_requests:
            raise ClientError(
                429, None,
                f"the server is busy ({self.active} generations queued or running, at most "
                f"{self.config.max_queued_requests}); retry later",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        self.active += 1

    def release(self) -> None:
        self.active = max(0, self.active - 1)

    # ---- execution

    async def _execute(self, call: Call, decoder: ChunkDecoder, decoded: _DecodedAudio, n: int) -> Any:
        kind, kwargs = call.kind, call.kwargs
        if kind == "condition":
            tokens = await asyncio.gather(
                *(self.handles["conditioner"].tokens.remote({"prompt": p}) for p in kwargs["prompts"])
            )
            return np.concatenate(tokens, axis=0)  # [P, Qm]
        if kind in STAGES:
            parts = await asyncio.gather(*(self.handles[kind].generate.remote(row) for row in _rows(kwargs, n)))
            return np.concatenate(parts, axis=0)
        if kind == "decode":
            codes, context = np.asarray(kwargs["codes"]), kwargs.get("context")
            full = codes if context is None or np.asarray(context).shape[-1] == 0 else np.concatenate(
                [np.asarray(context), codes], axis=-1
            )  # [N, K, c + f]
            rows = [{"codes": np.ascontiguousarray(full[i : i + 1])} for i in range(full.shape[0])]
            audio = await asyncio.gather(*(self.handles["codec"].decode.remote(row) for row in rows))
            decoded.set(np.concatenate(audio, axis=0))  # N x [1, T] -> [N, T]
            return decoder(codes, context, kwargs.get("final", False))
        if kind == "score":
            audio = np.asarray(kwargs["audio"], dtype=np.float32)
            rows = [{"audio": audio[i : i + 1], "prompt": kwargs["prompt"]} for i in range(audio.shape[0])]
            scores = await asyncio.gather(*(self.handles["conditioner"].score.remote(row) for row in rows))
            return np.concatenate(scores)  # [N]
        raise RuntimeError(f"the serve executor has no '{kind}' call")

    async def run(self, spec: GenerationSpec) -> AsyncIterator[dict[str, Any]]:
        """Execute the plan; yield each ``emit`` call's kwargs (``audio`` [N, T_i], and scores after rerank)."""
        configs = await self.stage_configs()
        decoded = _DecodedAudio()
        decoder = ChunkDecoder(decoded)
        steps = plan_steps(spec, configs)
        result = None
        while True:
            try:
                call = steps.send(result)
            except StopIteration:
                return
            if call.kind == "emit":
                result = None
                yield call.kwargs
            else:
                result = await self._execute(call, decoder, decoded, spec.num_samples)

    async def collect(self, spec: GenerationSpec) -> tuple[np.ndarray, dict[str, Any]]:
        """The whole audio [N, T] (and the last emit's extras: scores, order)."""
        chunks, extras = [], {}
        async for emitted in self.run(spec):
            chunks.append(np.asarray(emitted["audio"], dtype=np.float32))
            extras = {k: v for k, v in emitted.items() if k != "audio"}
        return np.concatenate(chunks, axis=1), extras


class LocalHandle:
    """A deployment's object in this process called like a ``DeploymentHandle`` (``handle.method.remote(x)``
    returns an awaitable): the in-process app the fuzz tests, the web test and the benchmark's baseline use."""

    def __init__(self, instance: Any) -> None:
        self._instance = instance

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._instance, name)

        class _Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Any:
                result = method(*args, **kwargs)
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    return result
                future = asyncio.get_running_loop().create_future()
                future.set_result(result)
                return future

        return _Method()


# ----------------------------------------------------------------------------- HTTP layer


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
        melody_tokens = None if melody is None else await service.melody_tokens(melody)
        spec = await service.spec(parsed, melody_tokens)
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


# ----------------------------------------------------------------------------- the Serve application


@serve.deployment
@serve.ingress()
class Ingress:
    """HTTP front: builds its FastAPI app around a :class:`MusicLMService` holding the stage handles."""

    def __init__(self, conditioner: Any, semantic: Any, coarse: Any, fine: Any, codec: Any, config: dict[str, Any]) -> None:
        handles = {"conditioner": conditioner, "semantic": semantic, "coarse": coarse, "fine": fine, "codec": codec}
        self.service = MusicLMService(handles, ServeConfig(**config))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service)


MODEL_CLASSES = {
    "conditioner": Conditioner,
    "semantic": SemanticStage,
    "coarse": CoarseStage,
    "fine": FineStage,
    "codec": Codec,
}


def build_app(config: ServeConfig) -> serve.Application:
    """The bound application: five model deployments and the ingress that composes their handles."""
    from ray.serve.config import BackpressureConfig

    checkpoints = str(Path(config.checkpoints).resolve())
    document = config.to_dict()
    bound = {
        name: deployment.options(**config.deployment_options(name)).bind(checkpoints, document)
        for name, deployment in MODEL_CLASSES.items()
    }
    ingress_options = config.deployment_options("ingress")
    # behind the ingress's own bound (a JSON 429), Serve's queue answers 429 too (plain text)
    ingress_options["max_queued_requests"] = config.max_queued_requests
    ingress_options["backpressure_config"] = BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S)
    return Ingress.options(**ingress_options).bind(
        bound["conditioner"], bound["semantic"], bound["coarse"], bound["fine"], bound["codec"], document
    )


def build_local_app(config: ServeConfig) -> FastAPI:
    """The same HTTP app with the five model objects in this process (no Ray): for tests, fuzzing and
    the benchmark's in-process baseline. Serve it with any ASGI server (uvicorn)."""
    check_checkpoints(config.checkpoints, config.preset)
    checkpoints = str(Path(config.checkpoints).resolve())
    document = config.to_dict()
    handles = {
        name: LocalHandle(deployment.func_or_class(checkpoints, document)) for name, deployment in MODEL_CLASSES.items()
    }
    return create_app(MusicLMService(handles, config))


def save_random_system(ckpt_dir: str | Path, preset: str = "tiny", melody: bool = False, seed: int = 0) -> Path:
    """A complete system checkpoint folder of *untrained* models (tokenizers as
    ``bundle.save_random_tokenizers``, random stages; with ``melody``, a melody tokenizer and stages
    conditioned on it): for serving tests and benchmarks, where noise is all the HTTP layer needs."""
    from musiclm.checkpoint import save_artifact
    from musiclm.models.stages import StageConfig
    from musiclm.models.transformer import StageTransformer
    from musiclm.tokenizers.bundle import save_random_tokenizers
    from musiclm.tokenizers.melody import load_melody_tokenizer, save_random_melody

    root = Path(ckpt_dir)
    save_random_tokenizers(root, preset, seed)
    melody_codebooks = melody_size = 0
    if melody:
        save_random_melody(root, preset, seed)
        tokenizer = load_melody_tokenizer(root, preset)
        melody_codebooks, melody_size = tokenizer.num_codebooks, tokenizer.codebook_size
    torch.manual_seed(seed)
    for stage in STAGES:
        extra = {"melody_codebooks": melody_codebooks, "melody_codebook_size": melody_size} if melody else {}
        config = StageConfig.preset(stage, preset, **extra)
        model = StageTransformer(config.transformer)
        save_artifact(root / stage, kind=stage, preset=preset, config=config, state_dict=model.state_dict(),
                      meta={"untrained": True, "seed": seed})
    return root


def run_server(config: ServeConfig, blocking: bool = True) -> str:
    """Check the checkpoints, connect to Ray (``config.address``: a cluster; None: local), start Serve
    on ``host:port``, deploy, and (if ``blocking``) serve until Ctrl-C / SIGTERM.

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
    logger.warning("musiclm is serving on %s (docs at %s/docs; Prometheus metrics at %s)", url, url, metrics_url())
    if not blocking:
        return url

    print(f"musiclm: serving on {url}  (OpenAPI docs: {url}/docs; metrics: {metrics_url()}; Ctrl-C to stop)",
          flush=True)
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
    "ClientError",
    "CoarseStage",
    "Codec",
    "Conditioner",
    "FineStage",
    "Ingress",
    "LocalHandle",
    "MusicLMService",
    "SemanticStage",
    "ServeConfig",
    "build_app",
    "build_local_app",
    "check_checkpoints",
    "components",
    "create_app",
    "decode_upload",
    "encode_wav",
    "error_field",
    "group_rows",
    "pcm16",
    "run_server",
    "save_random_system",
    "stack_rows",
    "wav_header",
    "STAGES",
]
