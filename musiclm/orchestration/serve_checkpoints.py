"""What the Serve application loads, checked before anything starts.

``COMPONENTS`` / :func:`components` name the artifact folders each model deployment loads (a replica
reads them again when it starts); :func:`check_checkpoints` checks the whole system folder up front, so a
missing or mismatched checkpoint is one clear error line before Ray or Serve is touched, not a replica
that fails to start minutes later.
"""

from pathlib import Path
from typing import Any

from musiclm.checkpoint import CheckpointError, read_artifact_config

# the artifact folders each deployment loads with our own tokenizers (kinds are the folder names, see
# docs/interfaces.md); ``components(checkpoints)`` gives those of the backends a folder chooses
COMPONENTS: dict[str, tuple[str, ...]] = {
    "conditioner": ("mulan", "mulan_rvq"),
    "semantic": ("semantic",),
    "coarse": ("coarse",),
    "fine": ("fine",),
    "codec": ("soundstream",),
}


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
