"""The three tokenizers MusicLM's data needs, loaded together from one checkpoint folder.

    wav (24 kHz) ──SoundStream──▶ A   int16 [F, 12]    acoustic tokens, 50 Hz
                 ──w2v-BERT + k-means──▶ S int16 [F/2]  semantic tokens, 25 Hz
                 ──MuLan audio tower + RVQ──▶ M_A int16 [12]  conditioning tokens

The Beam Tokenize step loads one bundle per worker (``DoFn.setup``) and calls
:meth:`TokenizerBundle.tokenize_windows` on batches of equal-length crop windows. ``ids`` are
the artifact ids of the folders used, recorded in every shard's metadata so that stage
checkpoints can be traced back to the exact tokenizers that produced their data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musiclm.checkpoint import CheckpointError, artifact_id, read_artifact_config
from musiclm.constants import ACOUSTIC_CODEBOOKS, ACOUSTIC_HOP, MULAN_CODEBOOKS, SEMANTIC_HOP

# folder -> the command that makes it (for the error when one is missing)
COMPONENT_COMMANDS = {
    "soundstream": "musiclm train soundstream --data AUDIO_SHARDS --out {ckpt}/soundstream",
    "w2vbert": "musiclm train w2vbert --data AUDIO_SHARDS --out {ckpt}/w2vbert",
    "semantic_kmeans": "musiclm fit semantic_kmeans --data AUDIO_SHARDS --tokenizers {ckpt}",
    "mulan": "musiclm train mulan --data AUDIO_SHARDS --out {ckpt}/mulan",
    "mulan_rvq": "musiclm fit mulan_rvq --data AUDIO_SHARDS --tokenizers {ckpt}",
}

_INT16_MAX = np.iinfo(np.int16).max
_LOCAL_COPIES: dict[str, str] = {}


def local_checkpoint_dir(ckpt_dir: str | Path) -> Path:
    """A local folder holding the tokenizer artifacts: ``ckpt_dir`` itself, or, for an fsspec URL
    (``gs://bucket/ckpt`` on Dataflow workers), a per-process temporary copy of the five folders'
    ``config.json`` + ``model.safetensors`` (artifacts load from local files only)."""
    text = str(ckpt_dir)
    if "://" not in text or text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    if text not in _LOCAL_COPIES:
        import tempfile

        import fsspec

        from musiclm.checkpoint import CONFIG_FILE, WEIGHTS_FILE

        fs, root = fsspec.core.url_to_fs(text)
        local = Path(tempfile.mkdtemp(prefix="musiclm-tokenizers-"))
        for name in COMPONENT_COMMANDS:
            for file in (CONFIG_FILE, WEIGHTS_FILE):
                remote = f"{root.rstrip('/')}/{name}/{file}"
                if fs.exists(remote):
                    (local / name).mkdir(exist_ok=True)
                    fs.get(remote, str(local / name / file))
        _LOCAL_COPIES[text] = str(local)
    return Path(_LOCAL_COPIES[text])


def _to_int16(codes: torch.Tensor, what: str) -> np.ndarray:
    """Token ids as int16 (every codebook here has <= 1024 entries); refuse ids that would wrap."""
    array = codes.detach().cpu().numpy()
    if array.size and (array.min() < 0 or array.max() > _INT16_MAX):
        raise ValueError(f"{what} token ids outside [0, {_INT16_MAX}]: cannot store them as int16")
    return array.astype(np.int16)


@dataclass
class TokenizerBundle:
    """SoundStream (``acoustic``), w2v-BERT + k-means (``semantic``) and MuLan + RVQ (``conditioner``)."""

    acoustic: Any
    semantic: Any
    conditioner: Any
    ids: dict[str, str]
    preset: str
    ckpt_dir: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @staticmethod
    def check_folders(ckpt_dir: str | Path) -> None:
        """Raise CheckpointError naming every missing component folder and the command that makes it."""
        ckpt = local_checkpoint_dir(ckpt_dir)
        missing = [name for name in COMPONENT_COMMANDS if not (ckpt / name / "config.json").is_file()]
        if missing:
            how = "; ".join(f"{name}/ (make it with `{COMPONENT_COMMANDS[name].format(ckpt=ckpt)}`)" for name in missing)
            raise CheckpointError(f"tokenizer checkpoint folder {ckpt} lacks {how}")

    @staticmethod
    def read_preset(ckpt_dir: str | Path) -> str:
        """The preset the tokenizers were trained with (that of ``soundstream/``), without loading weights."""
        TokenizerBundle.check_folders(ckpt_dir)
        return read_artifact_config(local_checkpoint_dir(ckpt_dir) / "soundstream")["preset"]

    @staticmethod
    def read_ids(ckpt_dir: str | Path) -> dict[str, str]:
        """Artifact ids of the five component folders (hashes of config + weights)."""
        TokenizerBundle.check_folders(ckpt_dir)
        return {name: artifact_id(local_checkpoint_dir(ckpt_dir) / name) for name in COMPONENT_COMMANDS}

    @classmethod
    def load(cls, ckpt_dir: str | Path, preset: str | None = None, device: str | torch.device = "cpu") -> TokenizerBundle:
        """Load ``soundstream/``, ``w2vbert/`` + ``semantic_kmeans/`` and ``mulan/`` + ``mulan_rvq/``.

        ``preset`` None accepts the preset the folders were trained with, but all five must agree.
        """
        from musiclm.tokenizers.mulan import load_conditioner
        from musiclm.tokenizers.semantic import load_semantic_tokenizer
        from musiclm.tokenizers.soundstream import load_soundstream

        ckpt = local_checkpoint_dir(ckpt_dir)  # a local copy when ckpt_dir is gs://... on a cloud worker
        cls.check_folders(ckpt)
        presets = {name: read_artifact_config(ckpt / name)["preset"] for name in COMPONENT_COMMANDS}
        if preset is None and len(set(presets.values())) > 1:
            raise CheckpointError(f"tokenizers in {ckpt} were trained with different presets: {presets}")
        preset = preset or presets["soundstream"]
        device = torch.device(device)
        acoustic = load_soundstream(ckpt / "soundstream", preset).to(device).eval()
        semantic = load_semantic_tokenizer(ckpt / "w2vbert", ckpt / "semantic_kmeans", preset).to(device).eval()
        conditioner = load_conditioner(ckpt / "mulan", ckpt / "mulan_rvq", preset).to(device).eval()
        return cls(acoustic, semantic, conditioner, cls.read_ids(ckpt), preset, str(ckpt_dir), device)

    @torch.no_grad()
    def tokenize_windows(self, wavs: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """A batch of crop windows (float32 [T] each, 24 kHz) -> one token dict per window.

        Windows of equal length run as one batch through each tokenizer; other lengths are batched
        separately. ``T`` must be a multiple of 960 samples (whole semantic frames).
        """
        results: list[dict[str, np.ndarray] | None] = [None] * len(wavs)
        by_length: dict[int, list[int]] = {}
        for i, wav in enumerate(wavs):
            wav = np.asarray(wav)
            if wav.ndim != 1 or wav.shape[0] < SEMANTIC_HOP:
                raise ValueError(f"a window must be float32 [T] with T >= {SEMANTIC_HOP}, got shape {wav.shape}")
            by_length.setdefault(wav.shape[0], []).append(i)
        for length, indices in by_length.items():
            if length % SEMANTIC_HOP:
                raise ValueError(f"window length {length} is not a multiple of {SEMANTIC_HOP} samples")
            batch = torch.from_numpy(np.stack([np.asarray(wavs[i], dtype=np.float32) for i in indices])).to(self.device)
            acoustic = self.acoustic.encode(batch)  # [B, 12, F]
            semantic = self.semantic.tokens(batch)  # [B, F / 2]
            mulan = self.conditioner.tokens_audio(batch)  # [B, 12]
            frames = length // ACOUSTIC_HOP
            if tuple(acoustic.shape[1:]) != (ACOUSTIC_CODEBOOKS, frames):
                raise ValueError(f"acoustic codes {tuple(acoustic.shape)} != [B, {ACOUSTIC_CODEBOOKS}, {frames}]")
            if tuple(semantic.shape[1:]) != (length // SEMANTIC_HOP,) or tuple(mulan.shape[1:]) != (MULAN_CODEBOOKS,):
                raise ValueError(f"semantic {tuple(semantic.shape)} / mulan {tuple(mulan.shape)} tokens have wrong shapes")
            acoustic_np = _to_int16(acoustic.transpose(1, 2), "acoustic")  # [B, 12, F] -> [B, F, 12]
            semantic_np = _to_int16(semantic, "semantic")
            mulan_np = _to_int16(mulan, "mulan")
            for row, i in enumerate(indices):
                results[i] = {"acoustic": acoustic_np[row], "semantic": semantic_np[row], "mulan": mulan_np[row]}
        return results  # type: ignore[return-value]

    def tokenize_window(self, wav: np.ndarray) -> dict[str, np.ndarray]:
        """One window float32 [T] -> ``{"acoustic": int16[F, 12], "semantic": int16[F/2], "mulan": int16[12]}``."""
        return self.tokenize_windows([wav])[0]


def save_random_tokenizers(ckpt_dir: str | Path, preset: str = "tiny", seed: int = 0) -> dict[str, str]:
    """Write the five tokenizer folders with *untrained* networks of ``preset``.

    For pipeline tests and throughput benchmarks only: the networks keep their random initial
    weights; the codebooks (SoundStream's RVQ, the semantic k-means, MuLan's RVQ) are fitted by
    k-means on the untrained networks' outputs for a few seconds of noisy tones, as training
    would initialise them, so that tokens vary with the audio. Returns the artifact ids.
    """
    from musiclm.checkpoint import save_artifact
    from musiclm.constants import MULAN_CODEBOOK_SIZE, MULAN_DIM, SAMPLE_RATE, SEMANTIC_CODEBOOK_SIZE
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
