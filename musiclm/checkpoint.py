"""Model artifacts: a folder with ``config.json`` and ``model.safetensors``.

Nothing here unpickles: weights are safetensors, configuration is JSON. An artifact names its
``kind`` (``soundstream``, ``w2vbert``, ``semantic_kmeans``, ``mulan``, ``mulan_rvq``,
``semantic``, ``coarse``, ``fine``) and its ``preset``; loading checks both so that a folder
from another component or another preset is refused with one clear sentence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import musiclm

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(Exception):
    """A checkpoint folder is missing, incomplete, or not the component it was asked to be."""


def _versions() -> dict[str, str]:
    return {"musiclm": musiclm.__version__, "torch": torch.__version__, "python": platform.python_version()}


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config (nested dataclasses and tuples allowed) as plain JSON data."""
    if dataclasses.is_dataclass(config):
        return json.loads(json.dumps(dataclasses.asdict(config)))
    return json.loads(json.dumps(config))


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a dataclass config, turning JSON lists back into tuples where the field default is one."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise CheckpointError(f"{cls.__name__} has no field(s) {sorted(unknown)}: the checkpoint is from another version")
    kwargs = {}
    for name, value in data.items():
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[name] = value
    return cls(**kwargs)


def save_artifact(
    out_dir: str | os.PathLike,
    *,
    kind: str,
    preset: str,
    config: Any,
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` atomically (temporary folder, then rename).

    Files other than these two already in ``out_dir`` (a ``training_state/`` for resuming) are kept.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    document = {
        "kind": kind,
        "preset": preset,
        "config": config_to_dict(config),
        "versions": _versions(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "meta": meta or {},
    }
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(document, f, indent=2, sort_keys=True)
        # weights first, config last: a folder with a config.json always has matching weights
        os.replace(os.path.join(tmp, WEIGHTS_FILE), out / WEIGHTS_FILE)
        os.replace(os.path.join(tmp, CONFIG_FILE), out / CONFIG_FILE)
    return out


def read_artifact_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of an artifact folder, with clear errors for what is missing."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}: not a musiclm checkpoint (or training never saved one)")
    try:
        document = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from exc
    for key in ("kind", "preset", "config"):
        if key not in document:
            raise CheckpointError(f"{cfg_path} lacks '{key}': not a musiclm checkpoint")
    return document


def load_artifact(
    path: str | os.PathLike, *, kind: str, preset: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an artifact, refusing one of another kind or preset. Returns (config.json document, weights)."""
    document = read_artifact_config(path)
    if document["kind"] != kind:
        raise CheckpointError(f"{path} holds a '{document['kind']}' checkpoint, expected '{kind}'")
    if preset is not None and document["preset"] != preset:
        raise CheckpointError(
            f"{path} was trained with preset '{document['preset']}', but preset '{preset}' was asked for"
        )
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}")
    return document, load_file(str(weights))


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``module.load_state_dict(weights)``, refusing weights of another architecture version with one
    clear ``CheckpointError`` instead of a page of key names."""
    expected = module.state_dict()
    missing = set(expected) - set(weights)
    unexpected = set(weights) - set(expected)
    reshaped = [k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape]
    if missing or unexpected or reshaped:
        raise CheckpointError(
            f"{path} does not fit this version's {type(module).__name__} ({len(missing)} missing, {len(unexpected)} "
            f"unexpected and {len(reshaped)} differently shaped tensors): it was saved by another version; retrain it"
        )
    module.load_state_dict(weights)


def artifact_id(path: str | os.PathLike) -> str:
    """A short content id (kind, preset and a hash of config + weights) recorded in shard metadata."""
    document = read_artifact_config(path)
    digest = hashlib.sha256()
    digest.update((Path(path) / CONFIG_FILE).read_bytes())
    with open(Path(path) / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{document['kind']}:{document['preset']}:{digest.hexdigest()[:12]}"


def copy_artifact(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the two artifact files (not training state) into another folder."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        shutil.copy2(Path(src) / name, Path(dst) / name)
