"""What the HTTP endpoint accepts.

The request model is strict on purpose: a client that sends ``"seconds": "ten"`` or a field the
server does not know gets a 4xx naming that field, never a silently coerced value. The limits that
depend on the deployment (longest clip, longest prompt, story length, samples per call) are not
baked into the model: they come in through pydantic's validation *context*, so one model serves
every ``ServeConfig``::

    GenerateRequest.model_validate(body, context=config.limits())

A request is either one ``prompt`` for ``seconds``, or a ``story``: a list of ``{"prompt", "seconds"}``
segments played one after the other (the conditioning changes at each boundary).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from musiclm.constants import SAMPLING_TEMPERATURES, SEMANTIC_FRAME_RATE
from musiclm.orchestration.serve_config import (
    DEFAULT_MAX_PROMPT_CHARS,
    DEFAULT_MAX_SECONDS,
    DEPLOYMENTS,
    ServeConfig,
)

MAX_TEMPERATURE = 5.0
MAX_SEED = 2**31 - 1
MAX_TOP_K = 65_536
MAX_GUIDANCE_SCALE = 20.0
MAX_PITCH_GUIDANCE = 100.0
DEFAULT_MAX_STORY_SEGMENTS = 16
DEFAULT_MAX_NUM_SAMPLES = 4
STAGES = ("semantic", "coarse", "fine")


def _limit(info: ValidationInfo, name: str, default: float) -> float:
    context = info.context or {}
    return context.get(name, default)


def _check_prompt(value: str, info: ValidationInfo) -> str:
    limit = int(_limit(info, "max_prompt_chars", DEFAULT_MAX_PROMPT_CHARS))
    if not value:
        raise PydanticCustomError("prompt_empty", "prompt must contain some text (it is empty or only whitespace)")
    if len(value) > limit:
        raise PydanticCustomError(
            "prompt_too_long",
            "prompt has {length} characters; at most {limit} are allowed",
            {"length": len(value), "limit": limit},
        )
    if "\x00" in value:
        raise PydanticCustomError("prompt_nul", "prompt must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): no tokenizer takes it
        raise PydanticCustomError(
            "prompt_encoding", "prompt must be valid Unicode text (it holds a lone surrogate)"
        ) from None
    return value


def _check_seconds(value: float, info: ValidationInfo) -> float:
    limit = float(_limit(info, "max_seconds", DEFAULT_MAX_SECONDS))
    if not math.isfinite(value) or value > limit:
        raise PydanticCustomError(
            "seconds_too_long", "seconds must be at most {limit} on this server", {"limit": f"{limit:g}"}
        )
    return value


Prompt = Annotated[str, StringConstraints(strip_whitespace=True)]


class Temperatures(BaseModel):
    """Per-stage sampling temperatures; a stage left out keeps the paper's value (1.0 / 0.95 / 0.4)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    semantic: float | None = Field(default=None, gt=0, le=MAX_TEMPERATURE)
    coarse: float | None = Field(default=None, gt=0, le=MAX_TEMPERATURE)
    fine: float | None = Field(default=None, gt=0, le=MAX_TEMPERATURE)

    def resolved(self) -> dict[str, float]:
        """All three temperatures, the paper's defaults filling the gaps."""
        return {stage: getattr(self, stage) or SAMPLING_TEMPERATURES[stage] for stage in STAGES}


class StorySegment(BaseModel):
    """One segment of a story: its prompt holds for ``seconds``."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: Prompt = Field(description="Text description of this segment's music.")
    seconds: float = Field(gt=0, description="Length of this segment in seconds.")

    _prompt = field_validator("prompt")(_check_prompt)
    _seconds = field_validator("seconds")(_check_seconds)


class GenerateRequest(BaseModel):
    """Body of ``POST /generate`` (and the ``request`` part of ``POST /generate/melody``)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"prompt": "a calm piano melody with soft strings", "seconds": 5.0},
                {"story": [{"prompt": "calm piano", "seconds": 15}, {"prompt": "energetic techno", "seconds": 15}]},
            ]
        },
    )

    prompt: Prompt | None = Field(
        default=None,
        description=f"Text description of the music (at most {DEFAULT_MAX_PROMPT_CHARS} characters by default). "
        "Give either prompt (with seconds) or story.",
    )
    story: list[StorySegment] | None = Field(
        default=None,
        min_length=1,
        description="Story mode: segments played in order, the conditioning changing at each boundary.",
    )
    seconds: float | None = Field(
        default=None,
        gt=0,
        description=f"Length of the clip in seconds with a prompt (at most {DEFAULT_MAX_SECONDS:g} by default).",
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Same seed, same request: same audio.")
    num_samples: int = Field(
        default=1, ge=1, description=f"Samples drawn in one call (at most {DEFAULT_MAX_NUM_SAMPLES} by default)."
    )
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K, description="Sample among the k likeliest tokens.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling: the smallest set of mass p.")
    guidance_scale: float = Field(
        default=1.0, ge=0, le=MAX_GUIDANCE_SCALE, description="Classifier-free guidance (1 = none)."
    )
    pitch_guidance: float = Field(
        default=0.0, ge=0, le=MAX_PITCH_GUIDANCE,
        description="With a melody upload: steer the coarse stage toward the melody's pitch with the pitch probe (0 = off).",
    )
    temperatures: Temperatures | None = Field(
        default=None, description="Sampling temperatures per stage, each in (0, 5]."
    )
    rerank: bool = Field(default=False, description="Return the best of num_samples by MuLan text-audio score.")
    stream: bool = Field(default=False, description="Chunked WAV: audio is sent as each window finishes.")

    _prompt = field_validator("prompt")(lambda value, info: None if value is None else _check_prompt(value, info))
    _seconds = field_validator("seconds")(lambda value, info: None if value is None else _check_seconds(value, info))

    @field_validator("seed", "num_samples", "top_k", mode="before")
    @classmethod
    def _integral(cls, value: Any) -> Any:
        """JSON Schema counts 3.0 as an integer: take it as 3 (3.5, "3" and true stay refused)."""
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            return int(value)
        return value

    @field_validator("story")
    @classmethod
    def _story_length(cls, value: list[StorySegment] | None, info: ValidationInfo) -> list[StorySegment] | None:
        limit = int(_limit(info, "max_story_segments", DEFAULT_MAX_STORY_SEGMENTS))
        if value is not None and len(value) > limit:
            raise PydanticCustomError(
                "story_too_long", "story has {length} segments; at most {limit} are allowed",
                {"length": len(value), "limit": limit},
            )
        return value

    @field_validator("num_samples")
    @classmethod
    def _samples_limit(cls, value: int, info: ValidationInfo) -> int:
        limit = int(_limit(info, "max_num_samples", DEFAULT_MAX_NUM_SAMPLES))
        if value > limit:
            raise PydanticCustomError(
                "too_many_samples", "num_samples must be at most {limit} on this server", {"limit": limit}
            )
        return value

    @model_validator(mode="after")
    def _one_mode(self, info: ValidationInfo) -> GenerateRequest:
        def refuse(field: str, message: str) -> PydanticCustomError:
            return PydanticCustomError("request_invalid", "{detail}", {"field": field, "detail": message})

        if self.prompt is None and self.story is None:
            raise refuse("prompt", "field 'prompt' is required (or give a 'story' instead)")
        if self.prompt is not None and self.story is not None:
            raise refuse("story", "give either 'prompt' (with 'seconds') or 'story', not both")
        if self.prompt is not None and self.seconds is None:
            raise refuse("seconds", "field 'seconds' is required with a prompt")
        if self.story is not None and self.seconds is not None:
            raise refuse("seconds", "with a story, each segment carries its own 'seconds'; leave 'seconds' out")
        limit = float(_limit(info, "max_seconds", DEFAULT_MAX_SECONDS))
        if self.total_seconds > limit:
            raise refuse("story", f"the story lasts {self.total_seconds:g} s; at most {limit:g} s on this server")
        if self.rerank and self.num_samples < 2:
            raise refuse("rerank", "rerank chooses among num_samples candidates: ask for num_samples >= 2")
        if self.rerank and self.stream:
            raise refuse("stream", "a reranked answer cannot stream (every candidate must finish first)")
        return self

    @property
    def segments(self) -> list[tuple[str, float]]:
        """``[(prompt, seconds)]``: one segment for a prompt, the story's otherwise."""
        if self.story is not None:
            return [(segment.prompt, segment.seconds) for segment in self.story]
        return [(str(self.prompt), float(self.seconds or 0.0))]

    @property
    def total_seconds(self) -> float:
        return float(sum(seconds for _, seconds in self.segments))

    @property
    def prompt_chars(self) -> int:
        return sum(len(prompt) for prompt, _ in self.segments)

    def resolved_temperatures(self) -> dict[str, float]:
        return (self.temperatures or Temperatures()).resolved()


def request_json_schema(limits: dict[str, Any] | None = None, ref_template: str = "#/$defs/{model}") -> dict[str, Any]:
    """``GenerateRequest``'s JSON schema with one server's limits written in (maximum seconds, prompt length,
    story length, samples) and the prompt-or-story rule as ``anyOf``: what the OpenAPI document shows
    clients, and what schema-driven fuzzers generate valid requests from."""
    limits = {"max_seconds": DEFAULT_MAX_SECONDS, "max_prompt_chars": DEFAULT_MAX_PROMPT_CHARS,
              "max_story_segments": DEFAULT_MAX_STORY_SEGMENTS, "max_num_samples": DEFAULT_MAX_NUM_SAMPLES,
              **(limits or {})}
    schema = GenerateRequest.model_json_schema(ref_template=ref_template)

    def patch(node: dict[str, Any], kind: str, **bounds: Any) -> None:
        for branch in node.get("anyOf", [node]):
            if branch.get("type") == kind:
                branch.update(bounds)

    props = schema["properties"]
    for name in ("prompt", "seconds", "story"):  # null is taken as absent; documented: present or left out
        branches = [b for b in props[name].pop("anyOf") if b.get("type") != "null"]
        props[name].update(branches[0])
        props[name].pop("default", None)
    minimum = 1.0 / SEMANTIC_FRAME_RATE  # one semantic frame (a story's segments are rounded cumulatively)
    patch(props["prompt"], "string", maxLength=int(limits["max_prompt_chars"]))
    patch(props["seconds"], "number", maximum=float(limits["max_seconds"]), minimum=minimum)
    patch(props["story"], "array", maxItems=int(limits["max_story_segments"]))
    props["num_samples"]["maximum"] = int(limits["max_num_samples"])
    segment = schema["$defs"]["StorySegment"]["properties"]
    patch(segment["prompt"], "string", maxLength=int(limits["max_prompt_chars"]))
    patch(segment["seconds"], "number", maximum=float(limits["max_seconds"]), minimum=minimum)
    schema["anyOf"] = [{"required": ["prompt", "seconds"]}, {"required": ["story"]}]
    short = min(5.0, float(limits["max_seconds"]))  # examples this server accepts
    schema["examples"] = [
        {"prompt": "a calm piano melody with soft strings", "seconds": short},
        {"story": [{"prompt": "calm piano", "seconds": short / 2}, {"prompt": "energetic techno", "seconds": short / 2}]},
    ]
    return schema


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
    context = first.get("ctx") or {}
    if name == "body" and isinstance(context.get("field"), str):  # a whole-request rule names its field
        name = context["field"]
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "extra_forbidden":
        message = f"unknown field '{name}'"
    elif first.get("type") == "missing":
        message = f"field '{name}' is required"
    elif name == "body" and first.get("type") in ("model_type", "dict_type", "model_attributes_type"):
        message = "the request body must be a JSON object"
    return {"field": name, "message": message}


def parse_generate_request(
    data: Any,
    *,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    max_story_segments: int = DEFAULT_MAX_STORY_SEGMENTS,
    max_num_samples: int = DEFAULT_MAX_NUM_SAMPLES,
) -> GenerateRequest:
    """Validate a decoded JSON body against this server's limits (raises ``ValidationError``)."""
    context = {
        "max_seconds": max_seconds,
        "max_prompt_chars": max_prompt_chars,
        "max_story_segments": max_story_segments,
        "max_num_samples": max_num_samples,
    }
    return GenerateRequest.model_validate(data, context=context)


__all__ = [
    "DEPLOYMENTS",
    "GenerateRequest",
    "ServeConfig",
    "StorySegment",
    "Temperatures",
    "ValidationError",
    "describe_validation_error",
    "error_field",
    "parse_generate_request",
    "request_json_schema",
]
