"""What the HTTP endpoint accepts, and how the server is configured.

The request model is strict on purpose: a client that sends ``"seconds": "ten"`` or a field the
server does not know gets a 4xx naming that field, never a silently coerced value. The limits that
depend on the deployment (longest clip, longest prompt) are not baked into the model: they come in
through pydantic's validation *context*, so one model serves every ``ServeConfig``::

    GenerateRequest.model_validate(body, context={"max_seconds": 30.0, "max_prompt_chars": 500})
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from musiclm.constants import SAMPLING_TEMPERATURES

DEFAULT_MAX_SECONDS = 30.0
DEFAULT_MAX_PROMPT_CHARS = 500
MAX_TEMPERATURE = 5.0
MAX_SEED = 2**31 - 1
STAGES = ("semantic", "coarse", "fine")
DEPLOYMENTS = ("ingress", "conditioner", "semantic", "coarse", "fine", "codec")


def _limit(info: ValidationInfo, name: str, default: float) -> float:
    context = info.context or {}
    return context.get(name, default)


class Temperatures(BaseModel):
    """Per-stage sampling temperatures; a stage left out keeps the paper's value (1.0 / 0.95 / 0.4)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    semantic: float | None = Field(default=None, gt=0, le=MAX_TEMPERATURE)
    coarse: float | None = Field(default=None, gt=0, le=MAX_TEMPERATURE)
    fine: float | None = Field(default=None, gt=0, le=MAX_TEMPERATURE)

    def resolved(self) -> dict[str, float]:
        """All three temperatures, the paper's defaults filling the gaps."""
        return {stage: getattr(self, stage) or SAMPLING_TEMPERATURES[stage] for stage in STAGES}


class GenerateRequest(BaseModel):
    """Body of ``POST /generate``: text prompt → ``seconds`` of 24 kHz music."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={"examples": [{"prompt": "a calm piano melody with soft strings", "seconds": 5.0}]},
    )

    prompt: Annotated[str, StringConstraints(strip_whitespace=True)] = Field(
        description=f"Text description of the music (at most {DEFAULT_MAX_PROMPT_CHARS} characters by default)."
    )
    seconds: float = Field(
        gt=0, description=f"Length of the clip in seconds (at most {DEFAULT_MAX_SECONDS:g} by default)."
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Same seed, same prompt: same audio.")
    temperatures: Temperatures | None = Field(
        default=None, description="Sampling temperatures per stage, each in (0, 5]."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_length(cls, value: str, info: ValidationInfo) -> str:
        limit = int(_limit(info, "max_prompt_chars", DEFAULT_MAX_PROMPT_CHARS))
        if not value:
            raise PydanticCustomError("prompt_empty", "prompt must contain some text (it is empty or only whitespace)")
        if len(value) > limit:
            raise PydanticCustomError(
                "prompt_too_long",
                "prompt has {length} characters; at most {limit} are allowed",
                {"length": len(value), "limit": limit},
            )
        return value

    @field_validator("seconds")
    @classmethod
    def _seconds_limit(cls, value: float, info: ValidationInfo) -> float:
        limit = float(_limit(info, "max_seconds", DEFAULT_MAX_SECONDS))
        if not math.isfinite(value) or value > limit:
            raise PydanticCustomError(
                "seconds_too_long", "seconds must be at most {limit} on this server", {"limit": f"{limit:g}"}
            )
        return value

    def resolved_temperatures(self) -> dict[str, float]:
        return (self.temperatures or Temperatures()).resolved()


def error_field(loc: tuple[Any, ...] | list[Any]) -> str:
    """A pydantic/FastAPI error location as a dotted field name, without FastAPI's ``body``/``query`` prefix."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def describe_validation_error(errors: list[dict[str, Any]]) -> dict[str, str]:
    """The first validation error as ``{"field": ..., "message": ...}``, the shape every 4xx answer uses."""
    if not errors:
        return {"field": "body", "message": "invalid request"}
    first = errors[0]
    name = error_field(first.get("loc", ()))
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        message = f"unknown field '{name}'"
    elif first.get("type") == "missing":
        message = f"field '{name}' is required"
    elif name == "body" and first.get("type") in ("model_type", "dict_type", "model_attributes_type"):
        message = "the request body must be a JSON object"
    return {"field": name, "message": message}


def parse_generate_request(data: Any, *, max_seconds: float, max_prompt_chars: int) -> GenerateRequest:
    """Validate a decoded JSON body against this server's limits (raises ``ValidationError``)."""
    return GenerateRequest.model_validate(
        data, context={"max_seconds": max_seconds, "max_prompt_chars": max_prompt_chars}
    )


def _default_num_cpus() -> dict[str, float]:
    # 1.4 CPUs in all: the whole application fits a 2-core laptop with room for the Serve proxy.
    return {"ingress": 0.1, "conditioner": 0.2, "semantic": 0.3, "coarse": 0.3, "fine": 0.3, "codec": 0.2}


def _default_zero() -> dict[str, float]:
    return {name: 0.0 for name in DEPLOYMENTS}


def _default_one() -> dict[str, int]:
    return {name: 1 for name in DEPLOYMENTS}


@dataclass
class ServeConfig:
    """Everything ``build_app`` / ``run_server`` need. Per-deployment dicts are keyed by ``DEPLOYMENTS``.

    Ray Serve reserves one whole CPU per replica unless told otherwise, which would hang six
    deployments on a 2-core machine: the defaults are fractions (1.4 CPUs in all). On a GPU cluster,
    give the stages ``num_gpus`` (fractions allowed) and more ``num_replicas``.
    """

    checkpoints: str = "checkpoints"
    host: str = "127.0.0.1"
    port: int = 8000
    max_seconds: float = DEFAULT_MAX_SECONDS
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    num_cpus: dict[str, float] = field(default_factory=_default_num_cpus)
    num_gpus: dict[str, float] = field(default_factory=_default_zero)
    num_replicas: dict[str, int] = field(default_factory=_default_one)
    max_ongoing_requests: int = 1  # per model replica: a stage samples one request at a time (KV cache)
    ingress_max_ongoing_requests: int = 32  # requests the ingress walks through the stages at once
    max_queued_requests: int = 64  # beyond this the ingress answers 503 instead of queueing
    request_timeout_s: float = 300.0  # a generation that takes longer answers 504
    max_body_bytes: int = 65_536
    torch_threads: int | None = None  # None: leave torch's default in each replica
    preset: str | None = None  # refuse checkpoints of another preset when set
    address: str | None = None  # Ray cluster address; None starts (or joins) a local Ray
    app_name: str = "musiclm"

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_gpus", "num_replicas"):
            value = getattr(self, name)
            unknown = set(value) - set(DEPLOYMENTS)
            if unknown:
                raise ValueError(f"ServeConfig.{name} has unknown deployment(s) {sorted(unknown)}; use {DEPLOYMENTS}")
            defaults = {"num_cpus": _default_num_cpus, "num_gpus": _default_zero, "num_replicas": _default_one}[name]()
            setattr(self, name, {**defaults, **value})
        if self.max_seconds <= 0:
            raise ValueError("ServeConfig.max_seconds must be > 0")
        if self.max_prompt_chars < 1:
            raise ValueError("ServeConfig.max_prompt_chars must be >= 1")
        if self.request_timeout_s <= 0:
            raise ValueError("ServeConfig.request_timeout_s must be > 0")
        if any(v < 0 for v in self.num_cpus.values()) or any(v < 0 for v in self.num_gpus.values()):
            raise ValueError("ServeConfig.num_cpus / num_gpus must be >= 0")
        if self.max_ongoing_requests < 1 or self.ingress_max_ongoing_requests < 1:
            raise ValueError("ServeConfig.max_ongoing_requests / ingress_max_ongoing_requests must be >= 1")
        if any(v < 1 for v in self.num_replicas.values()):
            raise ValueError("ServeConfig.num_replicas must be >= 1 per deployment")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = [
    "DEPLOYMENTS",
    "GenerateRequest",
    "ServeConfig",
    "Temperatures",
    "ValidationError",
    "describe_validation_error",
    "error_field",
    "parse_generate_request",
]
