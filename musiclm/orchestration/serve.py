"""The finished cascade over HTTP: a Ray Serve application with one deployment per stage.

    Ingress ──▶ Conditioner (MuLan / CLAP text → M_T; melody tokens; MuLan scores for re-ranking)
            ──▶ SemanticStage ──▶ CoarseStage ──▶ FineStage   (one window of one stage per call)
            ──▶ Codec (acoustic tokens → 24 kHz audio)

Each stage is its own deployment so that a cluster can give the heavy Transformers GPUs and
replicas (or autoscaling) of their own while the light parts share a CPU; ``ServeConfig``
(``examples/serve.yaml``) sets all of it. Tensors cross deployments as numpy arrays. Each stage
method is a ``@serve.batch`` handler, so rows of concurrent requests (and the N rows of one request)
share forward passes; each row draws from its own ``row_generator(seed, row, stage, window)``, so a
request's audio does not depend on which other requests shared its batches.

This module holds the deployments and the application built from them; the parts live in
    serve_checkpoints.py   which folders each deployment loads; the up-front checkpoint check
    batching.py            rows: split by the ingress, grouped and stacked by the model replicas
    service.py             MusicLMService: executes ``plan_steps`` with the deployment handles
    http_api.py            the FastAPI app of the ingress: routes, limits, WAV bytes, streaming, errors
    serve_metrics.py       Ray metrics (Prometheus) and where they are scraped
    random_system.py       a checkpoint folder of untrained models, for tests and benchmarks
and their public names are re-exported here (``from musiclm.orchestration.serve import ...``).
Metrics (``ray.util.metrics``) go to Ray's Prometheus endpoint with Ray Serve's own (``GET /health``
names its URL).
"""

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from ray import serve

from musiclm.checkpoint import artifact_id, read_artifact_config
from musiclm.orchestration import ray_cluster
from musiclm.orchestration.batching import ROW_KEYS, batch_handler, group_rows, split_rows, stack_rows
from musiclm.orchestration.http_api import (
    HEALTH_TIMEOUT_S,
    REQUEST_ID,
    create_app,
    decode_upload,
    encode_wav,
    error_response,
    pcm16,
    wav_header,
)
from musiclm.orchestration.random_system import save_random_system
from musiclm.orchestration.schemas import STAGES, error_field
from musiclm.orchestration.serve_checkpoints import COMPONENTS, check_checkpoints, components
from musiclm.orchestration.serve_config import ServeConfig
from musiclm.orchestration.serve_metrics import batch_rows_histogram, metrics_url
from musiclm.orchestration.service import RETRY_AFTER_S, ClientError, LocalHandle, MusicLMService

logger = logging.getLogger("ray.serve")


# ----------------------------------------------------------------------------- model deployments
# Heavy imports happen in the replicas' constructors: the driver that builds the application
# never loads a model, and each replica imports only what it runs.


class _ModelReplica:
    """What every model deployment shares: torch threads, device, artifact ids, batching and one lock.

    A batched method is :func:`~musiclm.orchestration.batching.batch_handler` applied per instance (so
    the batch size and wait come from the config, and each instance has its own queue): ``serve.batch``
    over a ``Coalescer`` that merges the batches queued while the model was busy. A batch runs in a
    worker thread so the replica's event loop keeps queueing meanwhile; the lock serialises the model (a
    stage keeps its KV cache on the module, and a Hugging Face fast tokenizer refuses concurrent use).
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
        self._batch_metric = batch_rows_histogram()

    def batched(self, compute: Callable[[list[dict[str, Any]]], list[Any]]) -> Callable[..., Any]:
        """``compute(rows) -> results`` as a ``@serve.batch`` handler taking one row per call."""
        size, wait = self.settings.max_batch_size[self.name], self.settings.batch_wait_timeout_s[self.name]
        return batch_handler(lambda rows: self._run_batch(compute, rows), size, wait)

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
        self.extra: dict[str, Any] = {}  # the coarse stage's optional pitch probe (a request's pitch_guidance)
        if self.stage == "coarse":
            from musiclm.training.pitch_probe_learner import load_pitch_probe_in

            probe = load_pitch_probe_in(self.root, device=self.device)
            if probe is not None:
                folder = self.root / "pitch_probe"
                self.extra["pitch_probe"] = probe
                self.artifacts["pitch_probe"] = {"id": artifact_id(folder), "preset": read_artifact_config(folder)["preset"]}
        self.generate = self.batched(self._generate)

    def _generate(self, rows: list[dict[str, Any]]) -> list[np.ndarray]:
        """Rows of one group -> one window call with B rows -> B results [1, ...]."""
        out = np.asarray(self.window(self.model, self.config, **stack_rows(rows), **self.extra))
        return list(np.split(out, len(rows), axis=0))

    def has_pitch_probe(self) -> bool:
        """Whether this stage can take ``pitch_guidance`` (a coarse stage with ``<checkpoints>/pitch_probe``)."""
        return "pitch_probe" in self.extra

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
            # arrays from Ray's object store are read-only: a copy, as torch wants writable memory
            codes = torch.from_numpy(np.array(row["codes"], dtype=np.int64)).to(self.device)  # [1, K, F]
            wav = torch.as_tensor(self.codec.decode(codes)).float().reshape(1, -1)  # [1, F * hop]
            out.append(wav.cpu().numpy())
        return out


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
    ingress_options["max_queued_requests"] = config.router_queue()
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


# the public names of the parts, re-exported: ``from musiclm.orchestration.serve import ...`` keeps working
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
    "HEALTH_TIMEOUT_S",
    "REQUEST_ID",
    "RETRY_AFTER_S",
    "ROW_KEYS",
    "error_response",
    "metrics_url",
    "split_rows",
]
