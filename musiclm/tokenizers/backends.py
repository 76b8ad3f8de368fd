"""Which model makes each kind of token: ours (SoundStream, w2v-BERT, MuLan) or a pretrained one.

A tokenizer checkpoint folder (``CKPT_DIR``) may hold ``backends.json``; without it every role uses
our own models, trained into the component folders. With it, a role may name a pretrained model in
a local folder, loaded through ``transformers`` (never from the network)::

    {"acoustic":    {"backend": "encodec", "path": "/models/encodec_24khz", "options": {"bandwidth": 6.0}},
     "semantic":    {"backend": "hubert",  "path": "/models/hubert-base",   "options": {"layer": 7}},
     "conditioner": {"backend": "clap",    "path": "/models/clap-htsat"}}

| role        | ours (default)                  | pretrained choices           | folders still needed in CKPT_DIR |
|-------------|---------------------------------|------------------------------|----------------------------------|
| acoustic    | ``soundstream``                 | ``encodec``                  | ``soundstream/`` only for ours   |
| semantic    | ``w2vbert`` (+ ``semantic_kmeans/``) | ``hubert``, ``w2v-bert-2.0`` | ``semantic_kmeans/`` always (our k-means on their features) |
| conditioner | ``mulan`` (+ ``mulan_rvq/``)     | ``clap``                     | ``mulan_rvq/`` always (our RVQ on their embeddings) |

Everything that names a tokenizer folder (tokenize, fit, train, generate, serve, eval) loads through
the functions below, so a backend is selectable everywhere at once.

``token_rates(ckpt_dir)`` gives the :class:`TokenRates` the tokens come at; ``token_info(ckpt_dir)``
(backend, version, rates, artifact ids) goes into every shard's metadata, and stage training refuses
shards whose ``token_info`` differ. ``set_backend`` (which loads the model once before writing) and
``describe_backends`` are what ``musiclm backends set|show`` call.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from musiclm.constants import (
    ACOUSTIC_CODEBOOK_SIZE,
    ACOUSTIC_CODEBOOKS,
    ACOUSTIC_FRAME_RATE,
    COARSE_LEVELS,
    MULAN_CODEBOOK_SIZE,
    MULAN_CODEBOOKS,
    SAMPLE_RATE,
    SEMANTIC_CODEBOOK_SIZE,
    SEMANTIC_FRAME_RATE,
)

BACKENDS_FILE = "backends.json"
ROLES = ("acoustic", "semantic", "conditioner")
OURS = {"acoustic": "soundstream", "semantic": "w2vbert", "conditioner": "mulan"}
PRETRAINED = {"acoustic": ("encodec",), "semantic": ("hubert", "w2v-bert-2.0"), "conditioner": ("clap",)}


@dataclass(frozen=True)
class TokenRates:
    """How many tokens of which vocabulary per second: what the stages' layouts are built from.
    The defaults are the paper's (SoundStream 50 Hz x 12 x 1024, semantic 25 Hz x 1024, MuLan 12 x 1024)."""

    acoustic_frame_rate: int = ACOUSTIC_FRAME_RATE
    acoustic_codebooks: int = ACOUSTIC_CODEBOOKS
    acoustic_codebook_size: int = ACOUSTIC_CODEBOOK_SIZE
    coarse_levels: int = COARSE_LEVELS
    semantic_frame_rate: int = SEMANTIC_FRAME_RATE
    semantic_codebook_size: int = SEMANTIC_CODEBOOK_SIZE
    conditioning_codebooks: int = MULAN_CODEBOOKS
    conditioning_codebook_size: int = MULAN_CODEBOOK_SIZE

    def __post_init__(self) -> None:
        if self.acoustic_frame_rate % self.semantic_frame_rate:
            raise ValueError(
                f"acoustic frame rate {self.acoustic_frame_rate} Hz is not a multiple of the semantic "
                f"{self.semantic_frame_rate} Hz"
            )
        if not 0 < self.coarse_levels < self.acoustic_codebooks:
            raise ValueError(f"coarse_levels must be in [1, {self.acoustic_codebooks - 1}], got {self.coarse_levels}")

    @property
    def frames_per_semantic(self) -> int:
        return self.acoustic_frame_rate // self.semantic_frame_rate

    @property
    def acoustic_hop(self) -> int:
        return SAMPLE_RATE // self.acoustic_frame_rate

    @property
    def semantic_hop(self) -> int:
        return SAMPLE_RATE // self.semantic_frame_rate

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenRates:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown token-rate fields {sorted(unknown)}")
        return cls(**data)


@dataclass
class BackendSpec:
    role: str
    backend: str
    path: str | None = None  # local folder of a pretrained model; None for ours
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def pretrained(self) -> bool:
        return self.backend != OURS[self.role]


def read_backends(ckpt_dir: str | Path) -> dict[str, BackendSpec]:
    """The backend of every role (ours where ``backends.json`` names none). Raises ValueError for an
    unknown role or backend, naming the valid ones."""
    path = Path(ckpt_dir) / BACKENDS_FILE
    specs = {role: BackendSpec(role, OURS[role]) for role in ROLES}
    if not path.is_file():
        return specs
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(document, dict):
        raise ValueError(f"{path} must hold an object with keys among {', '.join(ROLES)}")
    for role, entry in document.items():
        if role not in ROLES:
            raise ValueError(f"{path}: unknown role '{role}', valid roles are {', '.join(ROLES)}")
        if not isinstance(entry, dict) or "backend" not in entry:
            raise ValueError(f"{path}: '{role}' needs an object with a 'backend' key")
        backend = entry["backend"]
        valid = (OURS[role], *PRETRAINED[role])
        if backend not in valid:
            raise ValueError(f"{path}: unknown {role} backend '{backend}', valid ones are {', '.join(valid)}")
        spec = BackendSpec(role, backend, entry.get("path"), dict(entry.get("options") or {}))
        if spec.pretrained and not spec.path:
            raise ValueError(f"{path}: the {role} backend '{backend}' needs the 'path' of its local model folder")
        specs[role] = spec
    return specs


def write_backends(ckpt_dir: str | Path, specs: dict[str, BackendSpec]) -> Path:
    """Write ``backends.json`` with the pretrained roles of ``specs`` (ours are the default and omitted)."""
    path = Path(ckpt_dir) / BACKENDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        role: {"backend": s.backend, "path": str(Path(s.path).resolve()), "options": s.options}
        for role, s in specs.items()
        if s.pretrained
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


# The loaders below are the one place that dispatches on the backend. The pretrained branches live in
# musiclm.tokenizers.pretrained (imported lazily: transformers' model classes load slowly).
#
# load_acoustic(ckpt_dir, preset=None, device="cpu") -> acoustic tokenizer
#     encode(wav[B, T] 24 kHz) -> codes[B, K, F], decode(codes) -> wav, sample_rate, frame_rate,
#     num_codebooks, codebook_size, info() -> dict (backend, version, id, rates)
# load_semantic_features(ckpt_dir, preset=None, device="cpu") -> feature model
#     features(wav[B, T] 24 kHz) -> [B, T // 960, D] at 25 Hz, feature_dim, info()
# load_semantic(ckpt_dir, preset=None, device="cpu") -> semantic tokenizer (features + semantic_kmeans/)
#     tokens(wav) -> long[B, T // 960], features(wav), frame_rate, codebook_size
# load_conditioner_towers(ckpt_dir, preset=None, device="cpu") -> towers
#     embed_audio(wav[B, T] 24 kHz) -> [B, D] (L2-normalised, mean over 10-s windows, 1-s stride),
#     embed_text(list[str]) -> [B, D], embedding_dim, info()
# load_conditioner(ckpt_dir, preset=None, device="cpu") -> conditioner (towers + mulan_rvq/)
#     embed_audio, embed_text, tokens_audio(wav) -> long[B, 12], tokens_text(texts) -> long[B, 12],
#     num_codebooks, codebook_size
# token_rates(ckpt_dir) -> TokenRates;  token_info(ckpt_dir) -> dict for shard metadata


def _device(device: Any) -> Any:
    import torch

    return torch.device(device)


def load_acoustic(ckpt_dir: str | Path, preset: str | None = None, device: Any = "cpu") -> Any:
    spec = read_backends(ckpt_dir)["acoustic"]
    if spec.pretrained:
        from musiclm.tokenizers import pretrained

        return pretrained.load_acoustic(spec, _device(device))
    from musiclm.tokenizers.soundstream import load_soundstream

    return load_soundstream(Path(ckpt_dir) / "soundstream", preset).to(_device(device)).eval()


def load_semantic_features(ckpt_dir: str | Path, preset: str | None = None, device: Any = "cpu") -> Any:
    spec = read_backends(ckpt_dir)["semantic"]
    if spec.pretrained:
        from musiclm.tokenizers import pretrained

        return pretrained.load_semantic_features(spec, _device(device))
    from musiclm.tokenizers.semantic import load_w2vbert

    return load_w2vbert(Path(ckpt_dir) / "w2vbert", preset).to(_device(device)).eval()


def load_semantic(ckpt_dir: str | Path, preset: str | None = None, device: Any = "cpu") -> Any:
    from musiclm.checkpoint import CheckpointError
    from musiclm.tokenizers.semantic import SemanticTokenizer, load_kmeans

    features = load_semantic_features(ckpt_dir, preset, device)
    spec = read_backends(ckpt_dir)["semantic"]
    kmeans_dir = Path(ckpt_dir) / "semantic_kmeans"
    kmeans = load_kmeans(kmeans_dir, preset if not spec.pretrained else None)
    dim = int(kmeans.centroids.shape[-1])
    if dim != features.feature_dim:
        raise CheckpointError(
            f"{kmeans_dir} was fitted on {dim}-d features but the semantic backend {_describe_spec(spec)} "
            f"gives {features.feature_dim}-d ones: refit it "
            f"(musiclm fit semantic_kmeans --tokenizers {ckpt_dir})"
        )
    return SemanticTokenizer(features, kmeans).to(_device(device)).eval()


def load_conditioner_towers(ckpt_dir: str | Path, preset: str | None = None, device: Any = "cpu") -> Any:
    spec = read_backends(ckpt_dir)["conditioner"]
    if spec.pretrained:
        from musiclm.tokenizers import pretrained

        return pretrained.load_conditioner_towers(spec, _device(device))
    from musiclm.tokenizers.mulan import load_mulan

    return load_mulan(Path(ckpt_dir) / "mulan", preset).to(_device(device)).eval()


def load_conditioner(ckpt_dir: str | Path, preset: str | None = None, device: Any = "cpu") -> Any:
    from musiclm.checkpoint import CheckpointError
    from musiclm.tokenizers.mulan import MuLanConditioner, load_mulan_rvq

    towers = load_conditioner_towers(ckpt_dir, preset, device)
    spec = read_backends(ckpt_dir)["conditioner"]
    rvq_dir = Path(ckpt_dir) / "mulan_rvq"
    rvq = load_mulan_rvq(rvq_dir, preset if not spec.pretrained else None)
    if rvq.dim != towers.embedding_dim:
        raise CheckpointError(
            f"{rvq_dir} was fitted on {rvq.dim}-d embeddings but the conditioner backend "
            f"{_describe_spec(spec)} gives {towers.embedding_dim}-d ones: refit it "
            f"(musiclm fit mulan_rvq --tokenizers {ckpt_dir})"
        )
    return MuLanConditioner(towers, rvq).to(_device(device)).eval()


def _describe_spec(spec: BackendSpec) -> str:
    if not spec.pretrained:
        return f"'{spec.backend}' (ours)"
    options = f", {', '.join(f'{k}={v}' for k, v in spec.options.items())}" if spec.options else ""
    return f"'{spec.backend}' ({spec.path}{options})"


def token_rates(ckpt_dir: str | Path) -> TokenRates:
    """The rates and vocabularies of the tokens this folder's tokenizers make: the acoustic ones from the
    acoustic backend, the semantic vocabulary from ``semantic_kmeans/`` (its k) and the conditioning
    ones from ``mulan_rvq/`` (levels × codebook size) where those are fitted; the paper's otherwise."""
    from musiclm.checkpoint import CONFIG_FILE, read_artifact_config

    ckpt = Path(ckpt_dir)
    specs = read_backends(ckpt)
    fields: dict[str, int] = {}
    if specs["acoustic"].pretrained:
        from musiclm.tokenizers import pretrained

        fields.update(pretrained.backend_info(specs["acoustic"])["rates"])
    if (ckpt / "semantic_kmeans" / CONFIG_FILE).is_file():
        fields["semantic_codebook_size"] = int(read_artifact_config(ckpt / "semantic_kmeans")["config"]["k"])
    if (ckpt / "mulan_rvq" / CONFIG_FILE).is_file():
        rvq = read_artifact_config(ckpt / "mulan_rvq")["config"]
        fields["conditioning_codebooks"] = int(rvq["num_quantizers"])
        fields["conditioning_codebook_size"] = int(rvq["codebook_size"])
    return TokenRates(**fields)


def token_info(ckpt_dir: str | Path) -> dict[str, Any]:
    """What every shard records about the tokenizers that made it: per role the backend, its version
    and id (an artifact id: hash of config and weights), and the token rates. Two shards mix only if
    their ``token_info`` are equal."""
    import importlib.metadata

    from musiclm.checkpoint import artifact_id

    ckpt = Path(ckpt_dir)
    specs = read_backends(ckpt)
    ours_folders = {"acoustic": ("soundstream",), "semantic": ("w2vbert",), "conditioner": ("mulan",)}
    ours_fitted = {"acoustic": (), "semantic": ("semantic_kmeans",), "conditioner": ("mulan_rvq",)}
    info: dict[str, Any] = {}
    for role, spec in specs.items():
        if spec.pretrained:
            from musiclm.tokenizers import pretrained

            entry = dict(pretrained.backend_info(spec))
            entry.pop("rates", None)
            folders = ours_fitted[role]
        else:
            entry = {"backend": spec.backend, "version": importlib.metadata.version("musiclm")}
            folders = ours_folders[role] + ours_fitted[role]
        entry["ids"] = {name: artifact_id(ckpt / name) for name in folders}
        info[role] = entry
    info["rates"] = token_rates(ckpt).to_dict()
    return info


# --------------------------------------------------------------------------- musiclm backends set | show

_LOADERS = {
    "acoustic": "load_acoustic",
    "semantic": "load_semantic_features",
    "conditioner": "load_conditioner_towers",
}
_FITTED = {"semantic": "semantic_kmeans", "conditioner": "mulan_rvq"}


def set_backend(
    ckpt_dir: str | Path,
    role: str,
    backend: str,
    path: str | Path | None = None,
    options: dict[str, Any] | None = None,
) -> Path:
    """Make ``role`` use ``backend`` in ``CKPT_DIR/backends.json`` (the other roles are kept) and return the
    file. A pretrained backend is loaded once first, so a folder, option or model that does not fit is
    refused (``CheckpointError`` / ``ValueError``) before anything is written; naming the role's own
    model (``soundstream``, ``w2vbert``, ``mulan``) resets the role to ours."""
    if role not in ROLES:
        raise ValueError(f"unknown role '{role}', valid roles are {', '.join(ROLES)}")
    valid = (OURS[role], *PRETRAINED[role])
    if backend not in valid:
        raise ValueError(f"unknown {role} backend '{backend}', valid ones are {', '.join(valid)}")
    specs = read_backends(ckpt_dir)
    if backend == OURS[role]:
        if path or options:
            raise ValueError(f"the {role} backend '{backend}' is ours: it takes no path or options")
        specs[role] = BackendSpec(role, backend)
    else:
        if not path:
            raise ValueError(f"the {role} backend '{backend}' needs the path of its local model folder")
        spec = BackendSpec(role, backend, str(Path(path).resolve()), dict(options or {}))
        from musiclm.tokenizers import pretrained

        getattr(pretrained, _LOADERS[role])(spec, _device("cpu"))
        specs[role] = spec
    return write_backends(ckpt_dir, specs)


def _fitted_summary(ckpt: Path, role: str) -> str:
    from musiclm.checkpoint import CONFIG_FILE, CheckpointError, read_artifact_config

    name = _FITTED[role]
    if not (ckpt / name / CONFIG_FILE).is_file():
        return f"{name}/ not fitted"
    try:
        cfg = read_artifact_config(ckpt / name)["config"]
    except CheckpointError as err:
        return f"{name}/ unreadable: {err}"
    if role == "semantic":
        return f"{name}/ {cfg['k']} × {cfg['dim']}-d"
    return f"{name}/ {cfg['num_quantizers']} × {cfg['codebook_size']} on {cfg['dim']}-d"


def describe_backends(ckpt_dir: str | Path) -> str:
    """A short table of which model makes each kind of token in ``ckpt_dir``, with the token rates.
    Reads configs only (no weights); a folder that would be refused shows its reason instead."""
    ckpt = Path(ckpt_dir)
    ours_folder = {"acoustic": "soundstream", "semantic": "w2vbert", "conditioner": "mulan"}
    try:
        specs = read_backends(ckpt)
    except ValueError as err:
        return f"{ckpt / BACKENDS_FILE}: {err}"
    rows = [("role", "backend", "model", "details")]
    for role, spec in specs.items():
        if spec.pretrained:
            from musiclm.checkpoint import CheckpointError
            from musiclm.tokenizers import pretrained

            try:
                info = pretrained.backend_info(spec)
            except (CheckpointError, ValueError) as err:
                rows.append((role, spec.backend, str(spec.path), f"REFUSED: {err}"))
                continue
            details = [" ".join(f"{k}={v}" for k, v in info["options"].items())]
            if "feature_dim" in info:
                details.append(f"{info['feature_dim']}-d features")
            if "embedding_dim" in info:
                details.append(f"{info['embedding_dim']}-d embeddings")
            model = f"{spec.path} ({info['id']}, transformers {info['version']})"
        else:
            folder = ours_folder[role]
            present = (ckpt / folder / "config.json").is_file()
            model, details = f"{folder}/" + ("" if present else " (missing)"), ["ours"]
        if role in _FITTED:
            details.append(_fitted_summary(ckpt, role))
        rows.append((role, spec.backend, model, "; ".join(d for d in details if d)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    try:
        r = token_rates(ckpt)
        lines.append(
            f"tokens: acoustic {r.acoustic_frame_rate} Hz × {r.acoustic_codebooks} × "
            f"{r.acoustic_codebook_size} (coarse {r.coarse_levels}), "
            f"semantic {r.semantic_frame_rate} Hz × {r.semantic_codebook_size}, "
            f"conditioning {r.conditioning_codebooks} × {r.conditioning_codebook_size}"
        )
    except Exception as err:  # noqa: BLE001 — a human summary shows the reason rather than failing
        lines.append(f"tokens: unknown ({err})")
    return "\n".join(line.rstrip() for line in lines)
