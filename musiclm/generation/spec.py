"""What one generation request asks for: prompts over time, seeds, sampling and batch size.

A :class:`GenerationSpec` is plain data (JSON-like fields, a numpy melody) so the CLI, the HTTP
schema and the tests build the same object; :func:`~musiclm.generation.plan.plan_steps` is the one
algorithm that turns it into stage calls. Validation lives here so every entry point refuses bad
input with the same ``ValueError`` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STAGE_NAMES = ("semantic", "coarse", "fine")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Segment:
    """``seconds`` of music described by ``prompt`` (story mode: several, one after the other)."""

    prompt: str
    seconds: float

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"segment prompt must be a non-empty string, got {self.prompt!r}")
        if not _is_number(self.seconds) or not math.isfinite(self.seconds) or self.seconds <= 0:
            raise ValueError(f"segment seconds must be a finite number > 0, got {self.seconds!r}")


@dataclass(frozen=True)
class Sampling:
    """How one stage draws its tokens: temperature (0 = greedy), top-k / top-p (nucleus) truncation,
    the classifier-free guidance scale (1 = plain conditional sampling) and the pitch guidance weight
    (:mod:`musiclm.models.pitch_probe`; 0 = off)."""

    temperature: float
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float = 1.0
    pitch_guidance: float = 0.0  # lambda of the pitch probe's log-probability (coarse stage; 0 = off)

    def __post_init__(self) -> None:
        if not _is_number(self.pitch_guidance) or not math.isfinite(self.pitch_guidance) or self.pitch_guidance < 0:
            raise ValueError(f"pitch_guidance must be a finite number >= 0, got {self.pitch_guidance!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if not _is_number(self.guidance_scale) or not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")


@dataclass(frozen=True)
class GenerationSpec:
    """One request: ``segments`` (prompt, seconds) played in order, ``num_samples`` rows drawn with
    ``seed`` (row i only depends on (seed, i), so it is the same in a batch of any size), per-stage
    ``temperatures`` (missing stages use their config's), top-k / top-p and guidance for every stage,
    optional melody tokens ``[Fm, Qmel]`` and melody contour ``[Fc]`` (one class per 40-ms frame, see
    :mod:`musiclm.tokenizers.contour`; both tiled over a long piece), and ``rerank``: order the rows by
    MuLan text-audio similarity, best first (the audio then arrives at the end, not window by window).
    ``pitch_guidance`` > 0 (with a melody): the coarse stage's draws are steered toward the contour's pitch
    classes by the pitch probe (:mod:`musiclm.models.pitch_probe`), with this weight."""

    segments: tuple[Segment, ...]
    seed: int = 0
    num_samples: int = 1
    temperatures: dict[str, float] | None = None
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float = 1.0
    melody_tokens: np.ndarray | None = field(default=None, compare=False)
    rerank: bool = False
    melody_contour: np.ndarray | None = field(default=None, compare=False)
    pitch_guidance: float = 0.0

    def __post_init__(self) -> None:
        segments = self.segments
        if isinstance(segments, Segment) or not isinstance(segments, Sequence) or not segments:
            raise ValueError("segments must be a non-empty list of Segment(prompt, seconds)")
        if not all(isinstance(s, Segment) for s in segments):
            raise ValueError("every segment must be a Segment(prompt, seconds)")
        object.__setattr__(self, "segments", tuple(segments))
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not _is_int(self.num_samples) or self.num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {self.num_samples!r}")
        if self.temperatures is not None:
            if not isinstance(self.temperatures, dict):
                raise ValueError("temperatures must be a dict {stage: temperature}")
            unknown = sorted(set(self.temperatures) - set(STAGE_NAMES))
            if unknown:
                raise ValueError(f"temperatures for unknown stages {unknown}: valid stages are {', '.join(STAGE_NAMES)}")
            for stage, t in self.temperatures.items():
                try:
                    Sampling(t)
                except ValueError as exc:
                    raise ValueError(f"temperatures['{stage}']: {exc}") from None
        Sampling(1.0, self.top_k, self.top_p, self.guidance_scale, self.pitch_guidance)  # checks them
        if self.pitch_guidance and self.melody_contour is None:
            raise ValueError("pitch_guidance steers the output toward a melody: give a melody (melody_contour)")
        if not isinstance(self.rerank, bool):
            raise ValueError(f"rerank must be true or false, got {self.rerank!r}")
        if self.rerank and self.num_samples < 2:
            raise ValueError("rerank needs num_samples >= 2 candidates to choose from")
        if self.melody_tokens is not None:
            melody = np.asarray(self.melody_tokens)
            if melody.ndim != 2 or melody.shape[0] < 1 or melody.shape[1] < 1:
                raise ValueError(f"melody_tokens must be [frames, codebooks] with both >= 1, got shape {melody.shape}")
            if not np.issubdtype(melody.dtype, np.integer) or melody.min() < 0:
                raise ValueError("melody_tokens must be non-negative integer codes")
            object.__setattr__(self, "melody_tokens", melody.astype(np.int64))
        if self.melody_contour is not None:
            from musiclm.tokenizers.contour import CONTOUR_CLASSES

            contour = np.asarray(self.melody_contour)
            if contour.ndim != 1 or contour.size < 1:
                raise ValueError(f"melody_contour must be [frames] with frames >= 1, got shape {contour.shape}")
            if not np.issubdtype(contour.dtype, np.integer) or contour.min() < 0 or contour.max() >= CONTOUR_CLASSES:
                raise ValueError(f"melody_contour must hold integer classes in [0, {CONTOUR_CLASSES})")
            object.__setattr__(self, "melody_contour", contour.astype(np.int64))

    @classmethod
    def single(cls, prompt: str, seconds: float, **kwargs: Any) -> GenerationSpec:
        """One prompt for the whole piece."""
        return cls(segments=(Segment(prompt, seconds),), **kwargs)

    @property
    def seconds(self) -> float:
        return float(sum(s.seconds for s in self.segments))

    def sampling(self, stage: str, default_temperature: float) -> Sampling:
        """The stage's sampling settings (its config's temperature unless ``temperatures`` names it)."""
        if stage not in STAGE_NAMES:
            raise ValueError(f"unknown stage '{stage}': valid stages are {', '.join(STAGE_NAMES)}")
        temperature = (self.temperatures or {}).get(stage, default_temperature)
        pitch = float(self.pitch_guidance) if stage == "coarse" else 0.0  # the coarse stage draws the pitch
        return Sampling(float(temperature), self.top_k, self.top_p, float(self.guidance_scale), pitch)


def parse_story(items: Sequence[str]) -> tuple[Segment, ...]:
    """``["calm piano:15", "energetic techno:15"]`` -> segments (the CLI's ``--story``); the last colon
    separates the seconds, so prompts may contain colons."""
    if isinstance(items, str) or not items:
        raise ValueError('a story is a non-empty list of "prompt:seconds" items')
    segments = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or ":" not in item:
            raise ValueError(f'story item {i} ({item!r}) is not "prompt:seconds"')
        prompt, _, seconds = item.rpartition(":")
        try:
            value = float(seconds)
        except ValueError:
            raise ValueError(f'story item {i} ({item!r}): "{seconds.strip()}" is not a number of seconds') from None
        try:
            segments.append(Segment(prompt.strip(), value))
        except ValueError as exc:
            raise ValueError(f"story item {i} ({item!r}): {exc}") from None
    return tuple(segments)
