"""How the Serve application is deployed: per-stage resources, batching, autoscaling, limits.

One dataclass, :class:`ServeConfig`, built in code or read from YAML (``examples/serve.yaml``
documents every key)::

    config = ServeConfig.from_yaml("serve.yaml")           # unknown keys: a ValueError naming them
    config = dataclasses.replace(config, address="ray://head:10001")

The YAML groups keys as a person thinks of them (``limits:``, ``deployments: {name: {...}}``);
the dataclass keeps them flat (one dict per per-deployment option, keyed by ``DEPLOYMENTS``), which
is what crosses to the ingress replica as plain JSON-able data.

Why the defaults: Ray Serve reserves one whole CPU per replica unless told otherwise, which hangs
six deployments on a 2-core machine, so the defaults are fractions (1.4 CPUs in all). A stage
replica batches concurrent requests (``@serve.batch``); Serve needs ``max_ongoing_requests`` of a
batched deployment to be at least ``max_batch_size`` or a batch can never fill.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEPLOYMENTS = ("ingress", "conditioner", "semantic", "coarse", "fine", "codec")
MODEL_DEPLOYMENTS = DEPLOYMENTS[1:]  # the batched ones
DEFAULT_MAX_SECONDS = 300.0  # 5 minutes of audio (long generation)
DEFAULT_MAX_PROMPT_CHARS = 500
DEFAULT_UPLOAD_FORMATS = ("wav", "flac", "ogg", "mp3")
BATCHES_IN_FLIGHT = 4  # batches a model replica may hold waiting for its model (serve.batch max_concurrent_batches)
INGRESS_SPARE = 16  # ingress slots beyond max_queued_requests: health checks and the page still answer
# Serve's own queue in front of the ingress (requests its router holds while the replica looks busy) is
# a last resort that answers a plain-text 429; under CPU load the router's view of the replica lags, so
# it is sized well above the ingress's JSON bound, which then answers first.
ROUTER_QUEUE_FACTOR = 4

# Serve's AutoscalingConfig keys accepted under ``autoscaling_config`` (checked here so that a typo is
# named before anything starts; Serve validates the values)
AUTOSCALING_KEYS = (
    "min_replicas",
    "max_replicas",
    "initial_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
    "upscaling_factor",
    "downscaling_factor",
    "metrics_interval_s",
    "look_back_period_s",
)
DEPLOYMENT_KEYS = (
    "num_replicas",
    "num_cpus",
    "num_gpus",
    "autoscaling_config",
    "max_batch_size",
    "batch_wait_timeout_s",
    "max_ongoing_requests",
)
LIMIT_KEYS = (
    "max_prompt_chars",
    "max_seconds",
    "max_story_segments",
    "max_num_samples",
    "max_upload_bytes",
    "upload_formats",
    "max_body_bytes",
)


def _default_num_cpus() -> dict[str, float]:
    # 1.4 CPUs in all: the whole application fits a 2-core laptop with room for the Serve proxy.
    return {"ingress": 0.1, "conditioner": 0.2, "semantic": 0.3, "coarse": 0.3, "fine": 0.3, "codec": 0.2}


def _default_zero() -> dict[str, float]:
    return {name: 0.0 for name in DEPLOYMENTS}


def _default_one() -> dict[str, int]:
    return {name: 1 for name in DEPLOYMENTS}


def _default_none() -> dict[str, Any]:
    return {name: None for name in DEPLOYMENTS}


def _default_batch() -> dict[str, int]:
    return {name: 8 for name in MODEL_DEPLOYMENTS}


def _default_wait() -> dict[str, float]:
    return {name: 0.01 for name in MODEL_DEPLOYMENTS}


_DEFAULTS = {
    "num_cpus": _default_num_cpus,
    "num_gpus": _default_zero,
    "num_replicas": _default_one,
    "autoscaling_config": _default_none,
    "max_batch_size": _default_batch,
    "batch_wait_timeout_s": _default_wait,
    "max_ongoing_requests": _default_none,
}


@dataclass
class ServeConfig:
    """Everything ``build_app`` / ``run_server`` need. Per-deployment dicts are keyed by ``DEPLOYMENTS``
    (``max_batch_size`` / ``batch_wait_timeout_s`` by the five model deployments); a partial dict is
    completed with the defaults."""

    checkpoints: str = "checkpoints"
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None  # Ray cluster address ("auto", "ray://head:10001"); None: a local Ray
    app_name: str = "musiclm"
    preset: str | None = None  # refuse checkpoints of another preset when set
    torch_threads: int | None = None  # None: leave torch's default in each replica
    access_log: bool = True  # Serve's line per HTTP request and per deployment call (our JSON request log stays)
    # limits (``limits:`` in YAML)
    max_seconds: float = DEFAULT_MAX_SECONDS  # of one request, a story's segments summed
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS  # of each prompt
    max_story_segments: int = 16
    max_num_samples: int = 4
    max_upload_bytes: int = 10 * 2**20  # a melody file
    upload_formats: tuple[str, ...] = DEFAULT_UPLOAD_FORMATS  # soundfile format names, lower case
    max_body_bytes: int = 65_536  # a JSON body
    # protection
    request_timeout_s: float = 300.0  # a generation that takes longer answers 504
    max_queued_requests: int = 64  # generations an ingress replica holds at once; beyond: 429
    # per deployment (``deployments: {name: {...}}`` in YAML)
    num_cpus: dict[str, float] = field(default_factory=_default_num_cpus)
    num_gpus: dict[str, float] = field(default_factory=_default_zero)
    num_replicas: dict[str, int] = field(default_factory=_default_one)
    autoscaling_config: dict[str, dict[str, Any] | None] = field(default_factory=_default_none)
    max_batch_size: dict[str, int] = field(default_factory=_default_batch)
    batch_wait_timeout_s: dict[str, float] = field(default_factory=_default_wait)
    max_ongoing_requests: dict[str, int | None] = field(default_factory=_default_none)  # None: derived

    def __post_init__(self) -> None:
        for name, default in _DEFAULTS.items():
            value = getattr(self, name)
            keys = MODEL_DEPLOYMENTS if name in ("max_batch_size", "batch_wait_timeout_s") else DEPLOYMENTS
            if not isinstance(value, dict):
                raise ValueError(f"ServeConfig.{name} must be a dict keyed by deployment, got {type(value).__name__}")
            unknown = set(value) - set(keys)
            if unknown:
                raise ValueError(f"ServeConfig.{name} has unknown deployment(s) {sorted(unknown)}; use {keys}")
            setattr(self, name, {**default(), **value})
        self.upload_formats = tuple(str(f).lower() for f in self.upload_formats)
        self._check()

    def _check(self) -> None:
        positive = {
            "max_seconds": self.max_seconds,
            "max_prompt_chars": self.max_prompt_chars,
            "max_story_segments": self.max_story_segments,
            "max_num_samples": self.max_num_samples,
            "max_upload_bytes": self.max_upload_bytes,
            "max_body_bytes": self.max_body_bytes,
            "request_timeout_s": self.request_timeout_s,
            "max_queued_requests": self.max_queued_requests,
        }
        for name, value in positive.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"ServeConfig.{name} must be a number > 0, got {value!r}")
        if not self.upload_formats:
            raise ValueError("ServeConfig.upload_formats must name at least one audio format")
        if any(v < 0 for v in self.num_cpus.values()) or any(v < 0 for v in self.num_gpus.values()):
            raise ValueError("ServeConfig.num_cpus / num_gpus must be >= 0")
        if any(v < 1 for v in self.num_replicas.values()):
            raise ValueError("ServeConfig.num_replicas must be >= 1 per deployment")
        for name, auto in self.autoscaling_config.items():
            if auto is None:
                continue
            if not isinstance(auto, dict):
                raise ValueError(f"ServeConfig.autoscaling_config['{name}'] must be a mapping or null")
            unknown = sorted(set(auto) - set(AUTOSCALING_KEYS))
            if unknown:
                raise ValueError(
                    f"ServeConfig.autoscaling_config['{name}'] has unknown key(s) {unknown}; use {AUTOSCALING_KEYS}"
                )
        for name in MODEL_DEPLOYMENTS:
            if self.max_batch_size[name] < 1:
                raise ValueError(f"ServeConfig.max_batch_size['{name}'] must be >= 1")
            if self.batch_wait_timeout_s[name] < 0:
                raise ValueError(f"ServeConfig.batch_wait_timeout_s['{name}'] must be >= 0")
        for name in DEPLOYMENTS:
            ongoing = self.max_ongoing_requests[name]
            floor = self.max_queued_requests if name == "ingress" else self.max_batch_size[name]
            if ongoing is not None and ongoing < floor:
                need = "max_batch_size" if name != "ingress" else "max_queued_requests"
                raise ValueError(
                    f"ServeConfig.max_ongoing_requests['{name}'] = {ongoing} is below its {need} "
                    f"({floor}): a batch could never fill / the queue never be used"
                )

    def ongoing(self, name: str) -> int:
        """``max_ongoing_requests`` of one deployment: as configured, else derived. A batched replica
        holds ``BATCHES_IN_FLIGHT`` full batches (Serve warns below max_batch_size x concurrent batches);
        the ingress every request it admits (its own queue bound answers 429 before Serve's)."""
        configured = self.max_ongoing_requests[name]
        if configured is not None:
            return int(configured)
        if name == "ingress":  # room for /health and the page while generations fill the queue
            return int(self.max_queued_requests) + INGRESS_SPARE
        return int(self.max_batch_size[name]) * BATCHES_IN_FLIGHT  # Serve: >= max_batch_size x concurrent batches

    def router_queue(self) -> int:
        """Serve's ``max_queued_requests`` for the ingress: a last-resort bound behind the ingress's own."""
        return ROUTER_QUEUE_FACTOR * int(self.max_queued_requests) + INGRESS_SPARE

    def deployment_options(self, name: str) -> dict[str, Any]:
        """The ``Deployment.options(...)`` of one deployment (replicas or autoscaling, resources, ongoing)."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.ongoing(name),
            "ray_actor_options": {"num_cpus": self.num_cpus[name], "num_gpus": self.num_gpus[name]},
            "logging_config": {"enable_access_log": bool(self.access_log)},
        }
        if self.autoscaling_config[name] is not None:
            options["autoscaling_config"] = dict(self.autoscaling_config[name])
        else:
            options["num_replicas"] = self.num_replicas[name]
        return options

    def limits(self) -> dict[str, Any]:
        """The request limits the schemas read from their validation context."""
        return {
            "max_seconds": self.max_seconds,
            "max_prompt_chars": self.max_prompt_chars,
            "max_story_segments": self.max_story_segments,
            "max_num_samples": self.max_num_samples,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, document: Any, source: str = "serve config") -> ServeConfig:
        """The YAML document's shape (``limits:``, ``deployments:``) -> a config; unknown keys are named."""
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise ValueError(f"{source}: the top level must be a mapping, got {type(document).__name__}")
        top = {f.name for f in dataclasses.fields(cls)} - set(_DEFAULTS) - set(LIMIT_KEYS)
        known = sorted(top | {"limits", "deployments"})
        unknown = sorted(set(document) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown key '{unknown[0]}' (known keys: {', '.join(known)})")
        kwargs: dict[str, Any] = {k: v for k, v in document.items() if k in top}
        limits = document.get("limits") or {}
        if not isinstance(limits, dict):
            raise ValueError(f"{source}: 'limits' must be a mapping")
        for key, value in limits.items():
            if key not in LIMIT_KEYS:
                raise ValueError(f"{source}: unknown key 'limits.{key}' (known: {', '.join(LIMIT_KEYS)})")
            kwargs[key] = tuple(value) if key == "upload_formats" else value
        deployments = document.get("deployments") or {}
        if not isinstance(deployments, dict):
            raise ValueError(f"{source}: 'deployments' must be a mapping of deployment name to options")
        per: dict[str, dict[str, Any]] = {name: {} for name in _DEFAULTS}
        for name, options in deployments.items():
            if name not in DEPLOYMENTS:
                raise ValueError(f"{source}: unknown deployment 'deployments.{name}' (known: {', '.join(DEPLOYMENTS)})")
            if not isinstance(options, dict):
                raise ValueError(f"{source}: 'deployments.{name}' must be a mapping")
            for key, value in options.items():
                if key not in DEPLOYMENT_KEYS:
                    raise ValueError(
                        f"{source}: unknown key 'deployments.{name}.{key}' (known: {', '.join(DEPLOYMENT_KEYS)})"
                    )
                if name == "ingress" and key in ("max_batch_size", "batch_wait_timeout_s"):
                    raise ValueError(f"{source}: 'deployments.ingress.{key}': the ingress does not batch")
                if key == "autoscaling_config" and isinstance(value, dict):
                    bad = sorted(set(value) - set(AUTOSCALING_KEYS))
                    if bad:
                        raise ValueError(
                            f"{source}: unknown key 'deployments.{name}.autoscaling_config.{bad[0]}' "
                            f"(known: {', '.join(AUTOSCALING_KEYS)})"
                        )
                per[key][name] = value
            if "num_replicas" in options and options.get("autoscaling_config") is not None:
                raise ValueError(
                    f"{source}: 'deployments.{name}' sets both num_replicas and autoscaling_config; "
                    "use autoscaling_config.min_replicas / max_replicas"
                )
        kwargs.update({key: value for key, value in per.items() if value})
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from exc

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServeConfig:
        """Read a YAML file (see ``examples/serve.yaml``); a relative ``checkpoints`` is relative to the
        file's folder, so a config can travel with its checkpoints."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"serve config {path} does not exist")
        try:
            document = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from exc
        config = cls.from_dict(document, source=str(path))
        if not Path(config.checkpoints).is_absolute() and isinstance(document, dict) and "checkpoints" in document:
            config.checkpoints = str((path.parent / config.checkpoints).resolve())
        return config


__all__ = [
    "AUTOSCALING_KEYS",
    "DEFAULT_MAX_PROMPT_CHARS",
    "DEFAULT_MAX_SECONDS",
    "DEPLOYMENTS",
    "MODEL_DEPLOYMENTS",
    "ServeConfig",
]
