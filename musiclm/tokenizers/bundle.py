"""The three tokenizers MusicLM's data needs, loaded together from one checkpoint folder.

    wav (24 kHz) ──acoustic (SoundStream / EnCodec)──▶ A   int16 [F, K]   acoustic tokens (50 Hz x 12 / 75 Hz x 8)
                 ──semantic features + k-means──▶     S   int16 [F_s]    semantic tokens, 25 Hz
                 ──conditioner towers + RVQ──▶        M_A int16 [12]     conditioning tokens
                 ──melody ViT + RVQ (optional)──▶     int16 [Fm, Qm]     melody tokens, 4-s windows, 3-s hop

Which model makes each kind of token is chosen by ``CKPT_DIR/backends.json``
(:mod:`musiclm.tokenizers.backends`; ours without it), and the bundle loads through those loaders.
The melody tokenizer (appendix C: ``melody/`` + ``melody_rvq/``) is optional: when the folder has it
(:func:`musiclm.tokenizers.melody.has_melody`) every window also gets ``melody`` tokens and
``token_info["melody"]`` records it; without it nothing changes.
The Beam Tokenize step loads one bundle per worker (``DoFn.setup``) and calls
:meth:`TokenizerBundle.tokenize_windows` on batches of equal-length crop windows. ``token_info``
(per role: backend, version, ids, and the token rates) and ``ids`` (artifact ids of the folders
used, plus the pretrained models' ids) go into every shard's metadata, so that stage training can
refuse shards of different tokenizers and stage checkpoints can be traced back to their data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musiclm.checkpoint import CheckpointError, read_artifact_config
from musiclm.constants import SAMPLE_RATE
from musiclm.tokenizers import backends
from musiclm.tokenizers.backends import BACKENDS_FILE, TokenRates
from musiclm.tokenizers.contour import melody_contour

# folder -> the command that makes it (for the error when one is missing)
COMPONENT_COMMANDS = {
    "soundstream": "musiclm train soundstream --data AUDIO_SHARDS --out {ckpt}/soundstream",
    "w2vbert": "musiclm train w2vbert --data AUDIO_SHARDS --out {ckpt}/w2vbert",
    "semantic_kmeans": "musiclm fit semantic_kmeans --data AUDIO_SHARDS --tokenizers {ckpt}",
    "mulan": "musiclm train mulan --data AUDIO_SHARDS --out {ckpt}/mulan",
    "mulan_rvq": "musiclm fit mulan_rvq --data AUDIO_SHARDS --tokenizers {ckpt}",
}
# the optional melody tokenizer (appendix C): both folders, or neither
MELODY_COMMANDS = {
    "melody": "musiclm train melody --data MELODY_AUDIO_SHARDS --out {ckpt}/melody",
    "melody_rvq": "musiclm fit melody_rvq --data AUDIO_SHARDS --tokenizers {ckpt}",
}
# per role: the folder of our own network (not needed with a pretrained backend), and the folder fitted
# on the network's outputs (always needed: our k-means / RVQ on the chosen features / embeddings)
ROLE_FOLDERS = {
    "acoustic": ("soundstream", None),
    "semantic": ("w2vbert", "semantic_kmeans"),
    "conditioner": ("mulan", "mulan_rvq"),
}
_ROLE_OF = {folder: role for role, folders in ROLE_FOLDERS.items() for folder in folders if folder}

_INT16_MAX = int(np.iinfo(np.int16).max)
_LOCAL_COPIES: dict[str, str] = {}


def local_checkpoint_dir(ckpt_dir: str | Path) -> Path:
    """A local folder holding the tokenizer artifacts: ``ckpt_dir`` itself, or, for an fsspec URL
    (``gs://bucket/ckpt`` on Dataflow workers), a per-process temporary copy of ``backends.json`` and
    the five folders' (and the melody tokenizer's two) ``config.json`` + ``model.safetensors``
    (artifacts load from local files only; a pretrained backend's model folder is a local path on every
    worker)."""
    text = str(ckpt_dir)
    if "://" not in text or text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    if text not in _LOCAL_COPIES:
        import tempfile

        import fsspec

        from musiclm.checkpoint import CONFIG_FILE, WEIGHTS_FILE

        fs, root = fsspec.core.url_to_fs(text)
        local = Path(tempfile.mkdtemp(prefix="musiclm-tokenizers-"))
        base = root.rstrip("/")
        if fs.exists(f"{base}/{BACKENDS_FILE}"):
            fs.get(f"{base}/{BACKENDS_FILE}", str(local / BACKENDS_FILE))
        for name in (*COMPONENT_COMMANDS, *MELODY_COMMANDS):
            for file in (CONFIG_FILE, WEIGHTS_FILE):
                remote = f"{base}/{name}/{file}"
                if fs.exists(remote):
                    (local / name).mkdir(exist_ok=True)
                    fs.get(remote, str(local / name / file))
        _LOCAL_COPIES[text] = str(local)
    return Path(_LOCAL_COPIES[text])


def required_folders(ckpt_dir: str | Path) -> list[str]:
    """The component folders the chosen backends need (ours: all five; with EnCodec no ``soundstream/``)."""
    specs = backends.read_backends(local_checkpoint_dir(ckpt_dir))
    needed = []
    for role, (network, fitted) in ROLE_FOLDERS.items():
        if not specs[role].pretrained:
            needed.append(network)
        if fitted:
            needed.append(fitted)
    return [name for name in COMPONENT_COMMANDS if name in needed]


def ids_from_token_info(info: dict[str, Any]) -> dict[str, str]:
    """The flat ``{name: id}`` of a ``token_info``: artifact ids of the folders used (the melody
    tokenizer's too, when there is one), and for each pretrained backend ``{backend: its id}`` (a hash of
    its files)."""
    ids: dict[str, str] = {}
    for role in backends.ROLES:
        entry = info.get(role) or {}
        ids.update(entry.get("ids") or {})
        if entry.get("backend") and entry["backend"] != backends.OURS[role]:
            ids[entry["backend"]] = str(entry.get("id"))
    ids.update((info.get("melody") or {}).get("ids") or {})
    return dict(sorted(ids.items()))


def check_int16_rates(rates: TokenRates, melody_codebook_size: int | None = None) -> None:
    """Shards store ids as int16: refuse a codebook with ids beyond 32767 before anything is tokenized."""
    sizes = [("acoustic", rates.acoustic_codebook_size), ("semantic", rates.semantic_codebook_size),
             ("conditioning", rates.conditioning_codebook_size)]
    if melody_codebook_size is not None:
        sizes.append(("melody", melody_codebook_size))
    for role, size in sizes:
        if size - 1 > _INT16_MAX:
            raise ValueError(
                f"the {role} codebook has {size} codes, but token shards store int16 ids (at most {_INT16_MAX + 1} "
                "codes): choose a backend or option with a smaller codebook"
            )


def _to_int16(codes: torch.Tensor, what: str, size: int) -> np.ndarray:
    """Token ids as int16; refuse ids outside the codebook (which would also wrap)."""
    array = codes.detach().cpu().numpy()
    if array.size and (array.min() < 0 or array.max() >= size):
        raise ValueError(f"{what} token ids outside [0, {size}) (min {array.min()}, max {array.max()})")
    return array.astype(np.int16)


@dataclass
class TokenizerBundle:
    """The acoustic tokenizer (``acoustic``), the semantic tokenizer (``semantic``) and the conditioner
    (``conditioner``) of one checkpoint folder, with the rates their tokens come at; ``melody`` is the
    optional melody tokenizer (None when the folder has none)."""

    acoustic: Any
    semantic: Any
    conditioner: Any
    ids: dict[str, str]
    preset: str
    ckpt_dir: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rates: TokenRates = field(default_factory=TokenRates)
    token_info: dict[str, Any] = field(default_factory=dict)
    melody: Any = None

    @property
    def backends(self) -> dict[str, str]:
        """``{role: backend}``, e.g. ``{"acoustic": "encodec", "semantic": "w2vbert", "conditioner": "mulan"}``."""
        return {role: (self.token_info.get(role) or {}).get("backend", backends.OURS[role]) for role in backends.ROLES}

    @staticmethod
    def check_folders(ckpt_dir: str | Path) -> None:
        """Raise CheckpointError naming every missing folder the chosen backends need, with the command
        that makes it (and any pretrained model folder named in ``backends.json`` that does not exist).
        The melody tokenizer is optional, but half of it (``melody/`` without ``melody_rvq/`` or the
        reverse) is refused rather than silently left out of the shards."""
        ckpt = local_checkpoint_dir(ckpt_dir)
        try:
            specs = backends.read_backends(ckpt)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        missing = [name for name in required_folders(ckpt) if not (ckpt / name / "config.json").is_file()]
        melody = [name for name in MELODY_COMMANDS if (ckpt / name / "config.json").is_file()]
        if melody:
            missing += [name for name in MELODY_COMMANDS if name not in melody]
        commands = {**COMPONENT_COMMANDS, **MELODY_COMMANDS}
        problems = [f"{name}/ (make it with `{commands[name].format(ckpt=ckpt)}`)" for name in missing]
        problems += [
            f"the {spec.backend} model folder {spec.path} named in {BACKENDS_FILE}"
            for spec in specs.values()
            if spec.pretrained and not Path(str(spec.path)).is_dir()
        ]
        if problems:
            raise CheckpointError(f"tokenizer checkpoint folder {ckpt} lacks {'; '.join(problems)}")

    @staticmethod
    def read_presets(ckpt_dir: str | Path) -> dict[str, str]:
        """``{folder: preset}`` of the folders the backends need (without loading weights)."""
        TokenizerBundle.check_folders(ckpt_dir)
        ckpt = local_checkpoint_dir(ckpt_dir)
        return {name: read_artifact_config(ckpt / name)["preset"] for name in required_folders(ckpt)}

    @staticmethod
    def read_preset(ckpt_dir: str | Path) -> str:
        """The preset the tokenizers were trained with (that of the first folder the backends need:
        ``soundstream/`` for ours), without loading weights."""
        return next(iter(TokenizerBundle.read_presets(ckpt_dir).values()))

    @staticmethod
    def read_token_info(ckpt_dir: str | Path) -> dict[str, Any]:
        """``backends.token_info`` of the folder (backends, versions, ids, rates), plus ``melody`` (ids,
        tokens per frame, framing) when the folder has a melody tokenizer: what every shard records."""
        from musiclm.tokenizers.melody import has_melody, melody_token_info

        TokenizerBundle.check_folders(ckpt_dir)
        ckpt = local_checkpoint_dir(ckpt_dir)
        info = backends.token_info(ckpt)
        if has_melody(ckpt):
            info["melody"] = melody_token_info(ckpt)
        melody_size = (info.get("melody") or {}).get("codebook_size")
        check_int16_rates(TokenRates.from_dict(info["rates"]), melody_size)
        return info

    @staticmethod
    def read_ids(ckpt_dir: str | Path) -> dict[str, str]:
        """Artifact ids of the folders used (hashes of config + weights), and the pretrained backends' ids."""
        return ids_from_token_info(TokenizerBundle.read_token_info(ckpt_dir))

    @classmethod
    def load(cls, ckpt_dir: str | Path, preset: str | None = None, device: str | torch.device = "cpu") -> TokenizerBundle:
        """Load the three tokenizers the backends name (ours: ``soundstream/``, ``w2vbert/`` + ``semantic_kmeans/``,
        ``mulan/`` + ``mulan_rvq/``), and the melody tokenizer (``melody/`` + ``melody_rvq/``) if there is one.

        ``preset`` None accepts the preset the folders were trained with, but our networks' folders must agree
        (the melody tokenizer keeps its own preset unless one is asked for).
        """
        from musiclm.tokenizers.melody import load_melody_tokenizer

        asked = preset
        ckpt = local_checkpoint_dir(ckpt_dir)  # a local copy when ckpt_dir is gs://... on a cloud worker
        presets = cls.read_presets(ckpt)
        specs = backends.read_backends(ckpt)
        # the folders of our own roles must share one preset; a pretrained role's k-means / RVQ has no say
        ours = {name: p for name, p in presets.items() if not specs[_ROLE_OF[name]].pretrained}
        if preset is None and len(set(ours.values())) > 1:
            raise CheckpointError(f"tokenizers in {ckpt} were trained with different presets: {ours}")
        preset = preset or next(iter(ours.values()), None) or next(iter(presets.values()))
        device = torch.device(device)
        info = cls.read_token_info(ckpt)
        rates = TokenRates.from_dict(info["rates"])
        acoustic = backends.load_acoustic(ckpt, preset, device)
        semantic = backends.load_semantic(ckpt, preset, device)
        conditioner = backends.load_conditioner(ckpt, preset, device)
        melody = load_melody_tokenizer(ckpt, asked, device) if "melody" in info else None
        return cls(acoustic, semantic, conditioner, ids_from_token_info(info), preset, str(ckpt_dir), device,
                   rates, info, melody)

    @torch.no_grad()
    def tokenize_windows(self, wavs: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """A batch of crop windows (float32 [T] each, 24 kHz) -> one token dict per window.

        Windows of equal length run as one batch through each tokenizer; other lengths are batched
        separately. ``T`` must be a multiple of the semantic hop (960 samples: whole 40-ms frames). The
        tokens' shapes are checked against the rates: acoustic ``[T // hop, K]`` (hop 480 x 12 levels
        for SoundStream, 320 x 8 for EnCodec at 6 kbps), semantic ``[T // 960]``, conditioning ``[12]``;
        with a melody tokenizer also ``melody`` ``[Fm, Qmel]`` (``Fm = melody_frame_count(T / 24000)``:
        3 for 10 s, 9 for 30 s, 1 for at most 4 s) and the melody contour ``contour`` int8 ``[T // 960]``
        (:mod:`musiclm.tokenizers.contour`: no model, the pitch class of each semantic frame).
        """
        r = self.rates
        results: list[dict[str, np.ndarray] | None] = [None] * len(wavs)
        by_length: dict[int, list[int]] = {}
        for i, wav in enumerate(wavs):
            wav = np.asarray(wav)
            if wav.ndim != 1 or wav.shape[0] < r.semantic_hop:
                raise ValueError(f"a window must be float32 [T] with T >= {r.semantic_hop}, got shape {wav.shape}")
            by_length.setdefault(wav.shape[0], []).append(i)
        for length, indices in by_length.items():
            if length % r.semantic_hop:
                raise ValueError(f"window length {length} is not a multiple of {r.semantic_hop} samples")
            batch = torch.from_numpy(np.stack([np.asarray(wavs[i], dtype=np.float32) for i in indices])).to(self.device)
            acoustic = self.acoustic.encode(batch)  # [B, K, F]
            semantic = self.semantic.tokens(batch)  # [B, F_s]
            mulan = self.conditioner.tokens_audio(batch)  # [B, Qm]
            frames = length * r.acoustic_frame_rate // SAMPLE_RATE
            if tuple(acoustic.shape[1:]) != (r.acoustic_codebooks, frames):
                raise ValueError(
                    f"acoustic codes {tuple(acoustic.shape)} != [B, {r.acoustic_codebooks}, {frames}] "
                    f"({r.acoustic_frame_rate} Hz x {r.acoustic_codebooks} codebooks for {length} samples)"
                )
            if tuple(semantic.shape[1:]) != (length // r.semantic_hop,):
                raise ValueError(f"semantic tokens {tuple(semantic.shape)} != [B, {length // r.semantic_hop}]")
            if tuple(mulan.shape[1:]) != (r.conditioning_codebooks,):
                raise ValueError(f"conditioning tokens {tuple(mulan.shape)} != [B, {r.conditioning_codebooks}]")
            acoustic_np = _to_int16(acoustic.transpose(1, 2), "acoustic", r.acoustic_codebook_size)  # [B, K, F] -> [B, F, K]
            semantic_np = _to_int16(semantic, "semantic", r.semantic_codebook_size)
            mulan_np = _to_int16(mulan, "conditioning", r.conditioning_codebook_size)
            melody_np = self._melody_tokens(batch) if self.melody is not None else None
            for row, i in enumerate(indices):
                results[i] = {"acoustic": acoustic_np[row], "semantic": semantic_np[row], "mulan": mulan_np[row]}
                if melody_np is not None:
                    results[i]["melody"] = melody_np[row]
                    results[i]["contour"] = melody_contour(wavs[i], length // r.semantic_hop)  # int8 [F_s]
        return results  # type: ignore[return-value]

    def _melody_tokens(self, batch: torch.Tensor) -> np.ndarray:
        """Melody tokens of equal-length windows ``[B, T]`` -> int16 ``[B, Fm, Qmel]``, shape-checked."""
        melody = self.melody.tokens(batch)  # [B, Fm, Qmel]
        expected = (self.melody.frame_count(batch.shape[1] / SAMPLE_RATE), self.melody.num_codebooks)
        if tuple(melody.shape[1:]) != expected:
            raise ValueError(f"melody tokens {tuple(melody.shape)} != [B, {expected[0]}, {expected[1]}]")
        return _to_int16(melody, "melody", self.melody.codebook_size)

    def tokenize_window(self, wav: np.ndarray) -> dict[str, np.ndarray]:
        """One window float32 [T] -> ``{"acoustic": int16[F, K], "semantic": int16[F_s], "mulan": int16[12]}``
        (and ``"melody": int16[Fm, Qmel]`` with a melody tokenizer)."""
        return self.tokenize_windows([wav])[0]


def save_random_tokenizers(ckpt_dir: str | Path, preset: str = "tiny", seed: int = 0) -> dict[str, str]:
    """Write the five tokenizer folders with *untrained* networks of ``preset``.

    For pipeline tests and throughput benchmarks only: the networks keep their random initial
    weights; the codebooks (SoundStream's RVQ, the semantic k-means, MuLan's RVQ) are fitted by
    k-means on the untrained networks' outputs for a few seconds of noisy tones, as training
    would initialise them, so that tokens vary with the audio. Returns the artifact ids.
    """
    from musiclm.checkpoint import save_artifact
    from musiclm.constants import MULAN_CODEBOOK_SIZE, MULAN_CODEBOOKS, MULAN_DIM, SEMANTIC_CODEBOOK_SIZE
    from musiclm.tokenizers.kmeans import KMeans
    from musiclm.tokenizers.mulan import MuLan, MuLanConfig, save_mulan, save_mulan_rvq
    from musiclm.tokenizers.rvq import ResidualVQ
    from musiclm.tokenizers.semantic import W2VBert, W2VBertConfig, save_kmeans, save_w2vbert
    from musiclm.tokenizers.soundstream import SoundStream, SoundStreamConfig

    ckpt = Path(ckpt_dir)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE  # 1-s clips of noisy tones: [8, 24000]
    audio = torch.from_numpy(np.stack([
        0.3 * np.sin(2 * np.pi * rng.uniform(80, 2000) * t) + 0.05 * rng.standard_normal(t.shape) for _ in range(8)
    ]).astype(np.float32))
    meta = {"untrained": True, "seed": seed}
    with torch.no_grad():
        soundstream_config = SoundStreamConfig.preset(preset)
        soundstream = SoundStream(soundstream_config).eval()
        latents = soundstream.encoder(audio[:, None]).transpose(1, 2)  # [8, 1, T] -> [8, F, D]
        soundstream.quantizer.fit(latents.reshape(-1, latents.shape[-1]), iters=2, seed=seed)  # [8 * F, D]
        save_artifact(ckpt / "soundstream", kind="soundstream", preset=preset, config=soundstream_config,
                      state_dict=soundstream.state_dict(), meta=meta)

        w2vbert = W2VBert(W2VBertConfig.preset(preset)).eval()
        save_w2vbert(w2vbert, ckpt / "w2vbert", preset, meta=meta)
        features = w2vbert.features(audio)  # [8, F, D]
        kmeans = KMeans(SEMANTIC_CODEBOOK_SIZE, w2vbert.config.dim).fit(features.reshape(-1, features.shape[-1]), iters=2, seed=seed)
        save_kmeans(kmeans, ckpt / "semantic_kmeans", preset, meta=meta)

        mulan = MuLan(MuLanConfig.preset(preset)).eval()
        save_mulan(mulan, ckpt / "mulan", preset, meta=meta)
        rvq = ResidualVQ(MULAN_DIM, MULAN_CODEBOOKS, MULAN_CODEBOOK_SIZE).fit(mulan.embed_audio(audio), iters=2, seed=seed)
        save_mulan_rvq(rvq, ckpt / "mulan_rvq", preset, meta=meta)
    return TokenizerBundle.read_ids(ckpt)
