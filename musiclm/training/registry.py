"""Which learner trains which component, and which kind of shards it reads.

The runner names components by their artifact kind (``soundstream``, ``semantic``, ...). The
learner classes are imported lazily, on the Ray worker that builds them, so that the driver
never loads model code it does not need. A name of the form ``"package.module:Class"`` names
any other class that follows the Learner protocol (docs/interfaces.md) — the tests use that.

Tokenizers learn from *audio* shards (``json`` + ``flac`` members; the melody embedder's carry
``melody_group`` in their ``json``); the three stages learn from *token* shards (``acoustic.npy`` /
``semantic.npy`` / ``mulan.npy``, and ``melody.npy`` when the tokenizers had a melody tokenizer).
Pointing a learner at the other kind is the most likely user mistake, so it is refused before Ray starts.
"""

from __future__ import annotations

import importlib
import inspect
import tarfile
from collections.abc import Callable, Sequence
from typing import Any

import torch

LEARNERS: dict[str, str] = {
    "soundstream": "musiclm.training.soundstream_learner:SoundStreamLearner",
    "w2vbert": "musiclm.training.w2vbert_learner:W2VBertLearner",
    "mulan": "musiclm.training.mulan_learner:MuLanLearner",
    "melody": "musiclm.training.melody_learner:MelodyLearner",
    "semantic": "musiclm.training.stage_learner:StageLearner",
    "coarse": "musiclm.training.stage_learner:StageLearner",
    "fine": "musiclm.training.stage_learner:StageLearner",
    "pitch_probe": "musiclm.training.pitch_probe_learner:PitchProbeLearner",
}

# options every learner of that name gets (the three stages share one class)
LEARNER_OPTIONS: dict[str, dict[str, Any]] = {
    "semantic": {"stage": "semantic"},
    "coarse": {"stage": "coarse"},
    "fine": {"stage": "fine"},
}

AUDIO, TOKENS = "audio", "tokens"
SHARD_KINDS: dict[str, str] = {
    "soundstream": AUDIO,
    "w2vbert": AUDIO,
    "mulan": AUDIO,
    "melody": AUDIO,  # audio shards whose sample json carries "melody_group"
    "semantic": TOKENS,
    "coarse": TOKENS,
    "fine": TOKENS,
    "pitch_probe": TOKENS,  # coarse codes and the melody contour
}

# total optimizer steps when the user gives none; a learner class may override with a
# ``default_max_steps`` attribute (an int, or a dict preset -> int)
DEFAULT_MAX_STEPS: dict[str, int] = {"tiny": 300, "paper": 500_000}

# a token sample may also carry melody.npy and contour.npy (when the tokenizer folder has a melody tokenizer)
TOKEN_MEMBERS = ("acoustic.npy", "semantic.npy", "mulan.npy", "melody.npy", "contour.npy")
AUDIO_MEMBERS = ("flac", "wav")


def _identity(model: torch.nn.Module) -> torch.nn.Module:
    return model


def learner_path(name: str) -> str:
    """``"module:Class"`` for a registered name, or ``name`` itself when it already is one."""
    if name in LEARNERS:
        return LEARNERS[name]
    if ":" in name:
        return name
    raise ValueError(f"unknown component '{name}': choose one of {sorted(LEARNERS)} (or give 'module:Class')")


def learner_class(name: str) -> type:
    """Import and return the learner class for ``name``."""
    module_name, _, attr = learner_path(name).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ImportError(f"the learner for '{name}' ({module_name}) cannot be imported: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ImportError(f"{module_name} has no learner class '{attr}'") from exc


def make_learner(
    name: str,
    preset: str,
    device: torch.device | str = "cpu",
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = _identity,
    **options: Any,
) -> Any:
    """Build the learner of component ``name`` (lazy import); registry options come first, caller's win."""
    cls = learner_class(name)
    kwargs = {**LEARNER_OPTIONS.get(name, {}), **options}
    return cls(preset, torch.device(device), wrap_model=wrap_model, **kwargs)


def accepted_options(name: str) -> set[str]:
    """The keyword options the learner's ``__init__`` names explicitly (``**options`` not counted)."""
    parameters = inspect.signature(learner_class(name).__init__).parameters.values()
    return {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def required_shard_kind(name: str) -> str | None:
    """``"audio"`` or ``"tokens"``; for a custom ``module:Class`` its ``shard_kind`` attribute, if any."""
    if name in SHARD_KINDS:
        return SHARD_KINDS[name]
    return getattr(learner_class(name), "shard_kind", None)


def default_max_steps(name: str, preset: str) -> int:
    """Total steps when none are given: the learner's ``default_max_steps``, else a preset default."""
    try:
        value = getattr(learner_class(name), "default_max_steps", None)
    except ImportError:
        value = None
    if isinstance(value, dict):
        value = value.get(preset)
    if isinstance(value, int) and value > 0:
        return value
    return DEFAULT_MAX_STEPS.get(preset, DEFAULT_MAX_STEPS["tiny"])


def shard_members(url: str, max_members: int = 16) -> set[str]:
    """Member suffixes (``json``, ``flac``, ``acoustic.npy`` ...) of the first sample of one shard."""
    import fsspec

    suffixes: set[str] = set()
    first_key = None
    with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        for i, member in enumerate(tar):
            if i >= max_members:
                break
            base = member.name.rsplit("/", 1)[-1]
            key, dot, suffix = base.partition(".")
            if not dot:
                continue
            if first_key is None:
                first_key = key
            elif key != first_key:
                break
            suffixes.add(suffix)
    return suffixes


def shard_kind(url: str) -> str | None:
    """What a shard holds: ``"tokens"``, ``"audio"`` or None (neither)."""
    members = shard_members(url)
    if any(m in members for m in TOKEN_MEMBERS):
        return TOKENS
    if any(m in members for m in AUDIO_MEMBERS):
        return AUDIO
    return None


def check_shard_kind(name: str, shards: Sequence[str]) -> None:
    """Refuse shards of the wrong kind for ``name`` (checks the first shard) with a ShardError."""
    wanted = required_shard_kind(name)
    if wanted is None or not shards:
        return
    found = shard_kind(shards[0])
    if found != wanted:
        error = _shard_error()
        what = {AUDIO: "audio shards (json + flac)", TOKENS: "token shards (acoustic/semantic/mulan .npy)"}
        found_text = what.get(found or "", "neither audio nor token samples")
        raise error(
            f"'{name}' trains on {what[wanted]}, but {shards[0]} holds {found_text}"
            + (": run `musiclm tokenize` first" if wanted == TOKENS else ": point --data at `musiclm prepare` output")
        )


def _shard_error() -> type[Exception]:
    """The data package's ShardError when it exists (the CLI prints it as one line), else ValueError."""
    try:
        from musiclm.data.shards import ShardError

        return ShardError
    except ImportError:
        return ValueError
