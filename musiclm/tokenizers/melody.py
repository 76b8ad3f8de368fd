"""The melody embedder of MusicLM's appendix C and its tokens (melody conditioning, §3.3 / appendix C).

MusicLM conditions on a melody (a hummed or whistled tune, another recording) through a small
embedding model trained so that two recordings of the same melody embed close together whatever
their instruments, accompaniment or tempo, and recordings of other melodies far apart:

* a ViT over log-mel frames: a *patch* is a few consecutive mel frames × all mel bins, projected to
  the model width, with a learned position embedding; 12 layers, 6 heads, width 512, FF 1024 in the
  paper; the output (a CLS token, or the mean of the patches) is projected to 192 dimensions and
  L2-normalised;
* trained with a semi-hard triplet loss (``musiclm.training.melody_learner``);
* one embedding per 4 s of audio with a 3-s hop (10 s -> 3 embeddings); each embedding is quantized by
  an RVQ (24 × 512 in the paper) fitted offline on embeddings of the corpus, like MuLan's RVQ, giving
  ``[Fm, 24]`` melody tokens that are concatenated with M_A (training) / M_T (inference).

The paper fixes neither the mel front end nor the patch size; the presets' choices are documented in
:class:`MelodyConfig`. Artifacts: ``CKPT_DIR/melody/`` (the embedder, kind ``melody``) and
``CKPT_DIR/melody_rvq/`` (the RVQ, kind ``melody_rvq``); both are optional parts of a tokenizer folder
(:func:`has_melody`): the tokenize job writes ``melody.npy`` only when they are there.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musiclm.audio.mel import MelSpectrogram
from musiclm.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    artifact_id,
    config_from_dict,
    load_artifact,
    load_weights,
    read_artifact_config,
    save_artifact,
)
from musiclm.constants import (
    MELODY_CODEBOOK_SIZE,
    MELODY_CODEBOOKS,
    MELODY_DIM,
    MELODY_HOP_SECONDS,
    MELODY_WINDOW_SECONDS,
    SAMPLE_RATE,
)
from musiclm.tokenizers.rvq import ResidualVQ

PRESETS = ("tiny", "paper")
MELODY_FOLDERS = ("melody", "melody_rvq")  # the artifact kinds, and their folder names in CKPT_DIR


@dataclass
class MelodyConfig:
    """Melody embedder sizes. Defaults are the paper's (appendix C): a ViT of 12 layers, 6 heads, width
    512, FF 1024, a 192-d output, 4-s windows with a 3-s hop, and an RVQ of 24 × 512 on the embeddings.

    512 is not divisible by 6 heads: as T5's ``d_kv`` decouples the head size from the model width, the
    heads are 64-d and attention works in an inner width of 6 × 64 = 384 (projected back to 512).

    Front end (not given by the paper; our choice): log-mel with a 2048-point FFT (11.7-Hz bins, enough
    to tell semitones apart above ~200 Hz) limited to 40 Hz .. 8 kHz where melodies and their first
    harmonics lie; 10-ms frames, 8 frames (80 ms, about a sixteenth note) per patch: 50 patches per 4 s.
    """

    sample_rate: int = SAMPLE_RATE
    # log-mel front end
    n_mels: int = 128
    n_fft: int = 2048
    hop_length: int = 240  # 10 ms
    f_min: float = 40.0
    f_max: float = 8000.0
    patch_frames: int = 8  # one patch = patch_frames mel frames x all mel bins
    # ViT
    layers: int = 12
    heads: int = 6
    head_dim: int = 64  # heads * head_dim = 384 != dim: T5-style decoupled attention width
    dim: int = 512
    ff_dim: int = 1024
    dropout: float = 0.1
    pool: str = "cls"  # "cls" (ViT's class token) or "mean" (mean of the patch outputs)
    embed_dim: int = MELODY_DIM
    # one embedding per window_seconds of audio, every hop_seconds
    window_seconds: float = MELODY_WINDOW_SECONDS
    hop_seconds: float = MELODY_HOP_SECONDS
    # the RVQ fitted on the embeddings (``musiclm fit melody_rvq``)
    rvq_codebooks: int = MELODY_CODEBOOKS
    rvq_codebook_size: int = MELODY_CODEBOOK_SIZE

    @classmethod
    def preset(cls, name: str) -> MelodyConfig:
        if name == "paper":
            return cls()
        if name == "tiny":
            # ~0.5M parameters: trains in about a minute on 2 CPU cores. 20-ms frames, 4 per patch (80 ms):
            # 50 patches per window as in the paper preset. The RVQ is 8 x 64 instead of 24 x 512: a small
            # corpus has a few hundred embeddings, which 64 codes already split finely at the first level
            # (deeper levels of a 512-code RVQ would quantize noise); 8 levels keep the tiny stages' melody
            # prefix short (3 x 8 tokens per 10 s instead of 3 x 24).
            return cls(
                n_mels=80,
                n_fft=1024,
                hop_length=480,
                f_max=4000.0,
                patch_frames=4,
                layers=3,
                heads=4,
                head_dim=32,
                dim=128,
                ff_dim=256,
                dropout=0.0,
                pool="mean",
                rvq_codebooks=8,
                rvq_codebook_size=64,
            )
        raise ValueError(f"unknown melody preset {name!r}; valid presets: {', '.join(PRESETS)}")

    def __post_init__(self) -> None:
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        for name in (
            "n_mels",
            "n_fft",
            "hop_length",
            "patch_frames",
            "layers",
            "heads",
            "head_dim",
            "dim",
            "ff_dim",
            "embed_dim",
            "rvq_codebooks",
            "rvq_codebook_size",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"MelodyConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.hop_seconds <= self.window_seconds:
            raise ValueError(
                f"need 0 < hop_seconds <= window_seconds, got {self.hop_seconds}, {self.window_seconds}"
            )
        if self.window_samples % self.hop_length:
            raise ValueError(
                f"a {self.window_seconds}-s window is not a whole number of {self.hop_length}-sample frames"
            )
        if self.window_frames % self.patch_frames:
            raise ValueError(
                f"{self.window_frames} frames per window do not split into patches of {self.patch_frames}"
            )

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * self.sample_rate))

    @property
    def hop_samples(self) -> int:
        return int(round(self.hop_seconds * self.sample_rate))

    @property
    def window_frames(self) -> int:
        return self.window_samples // self.hop_length

    @property
    def num_patches(self) -> int:
        return self.window_frames // self.patch_frames


def melody_frame_count(
    seconds: float, window_seconds: float = MELODY_WINDOW_SECONDS, hop_seconds: float = MELODY_HOP_SECONDS
) -> int:
    """Melody embeddings for ``seconds`` of audio: one per full 4-s window with a 3-s hop (10 s -> 3,
    30 s -> 9); audio of at most one window (shorter audio is zero-padded) -> 1."""
    if not seconds > 0:
        raise ValueError(f"audio length must be positive, got {seconds} s")
    samples = int(round(seconds * SAMPLE_RATE))
    window, hop = int(round(window_seconds * SAMPLE_RATE)), int(round(hop_seconds * SAMPLE_RATE))
    return 1 if samples <= window else 1 + (samples - window) // hop


# --------------------------------------------------------------------------- the ViT


class PatchEmbedding(nn.Module):
    """log-mel ``[B, n_mels, F]`` -> patch vectors ``[B, F / patch_frames, dim]``: each patch is
    ``patch_frames`` consecutive frames x all mel bins, layer-normalised (which also removes a patch's
    loudness offset in the log domain) and projected to the model width."""

    def __init__(self, config: MelodyConfig):
        super().__init__()
        self.patch_frames = config.patch_frames
        patch_dim = config.patch_frames * config.n_mels
        self.norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, config.dim)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        B, M, frames = mel.shape
        n, p = frames // self.patch_frames, self.patch_frames
        x = mel[..., : n * p].reshape(B, M, n, p)  # [B, n_mels, N, p]
        x = x.permute(0, 2, 3, 1).reshape(B, n, p * M)  # [B, N, p * n_mels]
        return self.proj(self.norm(x))  # [B, N, dim]


class Attention(nn.Module):
    """Multi-head self-attention with ``heads x head_dim`` inner width (not necessarily ``dim``)."""

    def __init__(self, config: MelodyConfig):
        super().__init__()
        self.heads, self.head_dim = config.heads, config.head_dim
        inner = config.heads * config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * inner)
        self.out = nn.Linear(inner, config.dim)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, self.head_dim)  # [B, N, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, Dh]
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )  # [B, H, N, Dh]
        y = y.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)  # [B, N, H * Dh]
        return self.out(y)  # [B, N, dim]


class Block(nn.Module):
    """Pre-norm Transformer encoder block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, config: MelodyConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, config.ff_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.ff_dim, config.dim),
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class MelodyEmbedder(nn.Module):
    """The ViT melody embedder: ``forward(mel[B, n_mels, F]) -> [B, 192]`` (L2-normalised) for one window
    per row (``F`` at most the frames of 4 s), and ``embed(wav[B, T]) -> [B, Fm, 192]`` for whole clips."""

    def __init__(self, config: MelodyConfig):
        super().__init__()
        self.config = config
        self.mel = MelSpectrogram(
            config.sample_rate, config.n_fft, config.hop_length, config.n_mels, config.f_min, config.f_max
        )
        self.patches = PatchEmbedding(config)
        extra = 1 if config.pool == "cls" else 0
        self.cls = nn.Parameter(torch.zeros(1, 1, config.dim)) if extra else None
        self.pos = nn.Parameter(0.02 * torch.randn(1, config.num_patches + extra, config.dim))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.embed_dim)
        self.apply(_init_weights)
        self.preset: str | None = None  # set by load_melody / the learner, recorded in the fitted RVQ

    @property
    def embedding_dim(self) -> int:
        return self.config.embed_dim

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """log-mel ``[B, n_mels, F]`` of one window per row -> ``[B, 192]`` unit vectors."""
        c = self.config
        if mel.dim() != 3 or mel.shape[1] != c.n_mels:
            raise ValueError(f"expected log-mel [B, {c.n_mels}, F], got shape {tuple(mel.shape)}")
        if not c.patch_frames <= mel.shape[2] <= c.window_frames:
            raise ValueError(
                f"a window has {c.patch_frames}..{c.window_frames} mel frames, got {mel.shape[2]}"
            )
        x = self.patches(mel)  # [B, N, dim]
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1 + N, dim]
        x = self.drop(x + self.pos[:, : x.shape[1]])
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        pooled = x[:, 0] if self.cls is not None else x.mean(dim=1)  # [B, dim]
        return F.normalize(self.head(pooled), dim=-1)  # [B, 192]

    def embed_windows(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav[N, window]`` (one 4-s window per row; shorter rows are zero-padded) -> ``[N, 192]``."""
        if wav.dim() != 2:
            raise ValueError(f"expected windows [N, T], got shape {tuple(wav.shape)}")
        if wav.shape[1] < self.config.window_samples:
            wav = F.pad(wav, (0, self.config.window_samples - wav.shape[1]))  # [N, window]
        return self(self.mel(wav[:, : self.config.window_samples]))

    def window_starts(self, num_samples: int) -> list[int]:
        """Start samples of the windows a clip is embedded from: every full 4-s window with a 3-s hop;
        a clip of at most one window is one (zero-padded) window."""
        c = self.config
        if num_samples <= c.window_samples:
            return [0]
        return list(range(0, num_samples - c.window_samples + 1, c.hop_samples))

    def frame_count(self, seconds: float) -> int:
        return melody_frame_count(seconds, self.config.window_seconds, self.config.hop_seconds)

    def embed(self, wav: torch.Tensor, max_windows_per_call: int = 64) -> torch.Tensor:
        """``wav[B, T]`` (24 kHz) -> ``[B, Fm, 192]``: one embedding per 4-s window with a 3-s hop
        (``Fm = melody_frame_count(T / 24000)``; audio shorter than 4 s is zero-padded to one window)."""
        if wav.dim() != 2:
            raise ValueError(f"embed takes a batch of waveforms [B, T], got shape {tuple(wav.shape)}")
        B, T = wav.shape
        if T < self.config.hop_length:
            raise ValueError(
                f"audio of {T} samples is too short to embed (one mel frame is {self.config.hop_length})"
            )
        window = self.config.window_samples
        if T < window:
            wav = F.pad(wav, (0, window - T))  # [B, window]
        starts = self.window_starts(T)
        windows = torch.stack([wav[:, s : s + window] for s in starts], dim=1)  # [B, Fm, window]
        flat = windows.reshape(B * len(starts), window)  # [B * Fm, window]
        emb = torch.cat(
            [self.embed_windows(chunk) for chunk in flat.split(max_windows_per_call)]
        )  # [B * Fm, D]
        return emb.view(B, len(starts), -1)  # [B, Fm, D]


def _init_weights(module: nn.Module) -> None:
    """ViT initialisation: truncated-normal(0.02) linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- tokens


class MelodyTokenizer(nn.Module):
    """The embedder + the RVQ fitted on its embeddings: ``tokens(wav[B, T]) -> long[B, Fm, Q]``."""

    def __init__(self, embedder: MelodyEmbedder, rvq: ResidualVQ):
        super().__init__()
        if rvq.dim != embedder.embedding_dim:
            raise ValueError(
                f"RVQ of dim {rvq.dim} cannot quantize {embedder.embedding_dim}-d melody embeddings"
            )
        self.embedder = embedder
        self.rvq = rvq

    @property
    def num_codebooks(self) -> int:
        return self.rvq.num_quantizers

    @property
    def codebook_size(self) -> int:
        return self.rvq.codebook_size

    @property
    def frame_hop_seconds(self) -> float:
        return self.embedder.config.hop_seconds

    @property
    def window_seconds(self) -> float:
        return self.embedder.config.window_seconds

    def frame_count(self, seconds: float) -> int:
        return self.embedder.frame_count(seconds)

    @torch.no_grad()
    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        return self.embedder.embed(wav)  # [B, Fm, D]

    @torch.no_grad()
    def tokens(self, wav: torch.Tensor) -> torch.Tensor:
        return self.rvq.encode(self.embed(wav))  # [B, Fm, D] -> [B, Fm, Q]


# --------------------------------------------------------------------------- artifacts


def save_melody(model: MelodyEmbedder, out_dir: str | Path, preset: str, meta: dict | None = None) -> Path:
    return save_artifact(
        out_dir, kind="melody", preset=preset, config=model.config, state_dict=model.state_dict(), meta=meta
    )


def load_melody(
    path: str | Path, preset: str | None = None, device: str | torch.device = "cpu"
) -> MelodyEmbedder:
    document, weights = load_artifact(path, kind="melody", preset=preset)
    model = MelodyEmbedder(config_from_dict(MelodyConfig, document["config"]))
    load_weights(model, weights, path)
    model.preset = document["preset"]
    return model.to(device).eval()


def save_melody_rvq(rvq: ResidualVQ, out_dir: str | Path, preset: str, meta: dict | None = None) -> Path:
    config = {"dim": rvq.dim, "num_quantizers": rvq.num_quantizers, "codebook_size": rvq.codebook_size}
    return save_artifact(
        out_dir, kind="melody_rvq", preset=preset, config=config, state_dict=rvq.state_dict(), meta=meta
    )


def load_melody_rvq(
    path: str | Path, preset: str | None = None, device: str | torch.device = "cpu"
) -> ResidualVQ:
    document, weights = load_artifact(path, kind="melody_rvq", preset=preset)
    cfg = document["config"]
    rvq = ResidualVQ(cfg["dim"], cfg["num_quantizers"], cfg["codebook_size"])
    load_weights(rvq, weights, path)
    return rvq.to(device).eval()


def _local(ckpt_dir: str | os.PathLike) -> Path | None:
    text = str(ckpt_dir)
    if "://" in text and not text.startswith("file://"):
        return None
    return Path(text.removeprefix("file://"))


def has_melody(ckpt_dir: str | os.PathLike) -> bool:
    """Whether a tokenizer folder (local or an fsspec URL) holds a melody tokenizer: ``melody/`` and
    ``melody_rvq/`` both saved."""
    local = _local(ckpt_dir)
    if local is not None:
        return all((local / name / CONFIG_FILE).is_file() for name in MELODY_FOLDERS)
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(ckpt_dir))
    return all(fs.exists(f"{root.rstrip('/')}/{name}/{CONFIG_FILE}") for name in MELODY_FOLDERS)


def load_melody_tokenizer(
    ckpt_dir: str | os.PathLike, preset: str | None = None, device: str | torch.device = "cpu"
) -> MelodyTokenizer:
    """The melody tokenizer of a (local) tokenizer folder: ``melody/`` + ``melody_rvq/``, ``eval()``ed."""
    ckpt = Path(ckpt_dir)
    missing = [name for name in MELODY_FOLDERS if not (ckpt / name / CONFIG_FILE).is_file()]
    if missing:
        make = {
            "melody": f"musiclm train melody --data AUDIO_SHARDS --out {ckpt}/melody",
            "melody_rvq": f"musiclm fit melody_rvq --data AUDIO_SHARDS --tokenizers {ckpt}",
        }
        raise CheckpointError(
            f"{ckpt} has no melody tokenizer: it lacks "
            + "; ".join(f"{name}/ (make it with `{make[name]}`)" for name in missing)
        )
    embedder = load_melody(ckpt / "melody", preset, device)
    rvq = load_melody_rvq(ckpt / "melody_rvq", preset, device)
    return MelodyTokenizer(embedder, rvq).eval()


def melody_tokens_of(ckpt_dir: str | os.PathLike, wav: np.ndarray) -> np.ndarray:
    """The melody tokens of one mono 24-kHz waveform ``[T]`` (a hum, a whistle): int64 ``[Fm, Q]``, what
    ``GenerationSpec.melody_tokens`` takes."""
    tokenizer = load_melody_tokenizer(ckpt_dir)
    with torch.inference_mode():
        return tokenizer.tokens(torch.as_tensor(np.asarray(wav, dtype=np.float32))[None])[0].long().numpy()  # [Fm, Q]


def melody_token_info(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """What shards record about the melody tokenizer of a local folder (without loading weights): its ids
    (hashes of config + weights), preset, token shape per frame and the framing."""
    ckpt = Path(ckpt_dir)
    embedder = read_artifact_config(ckpt / "melody")
    rvq = read_artifact_config(ckpt / "melody_rvq")["config"]
    config = embedder["config"]
    return {
        "backend": "melody",
        "version": importlib.metadata.version("musiclm"),
        "preset": embedder["preset"],
        "ids": {name: artifact_id(ckpt / name) for name in MELODY_FOLDERS},
        "num_codebooks": int(rvq["num_quantizers"]),
        "codebook_size": int(rvq["codebook_size"]),
        "dim": int(rvq["dim"]),
        "window_seconds": float(config["window_seconds"]),
        "frame_hop_seconds": float(config["hop_seconds"]),
    }


@torch.no_grad()
def fit_melody_rvq(
    embedder: MelodyEmbedder,
    wav_batches: Iterable[torch.Tensor | np.ndarray],
    out_dir: str | Path | None = None,
    *,
    max_embeddings: int | None = None,
    num_quantizers: int | None = None,
    codebook_size: int | None = None,
    iters: int = 20,
    seed: int = 0,
    preset: str | None = None,
    meta: dict | None = None,
) -> ResidualVQ:
    """Fit the melody RVQ (the config's size: 24 x 512 in the paper) by k-means on successive residuals of
    the melody embeddings of ``wav_batches`` (``[B, T]`` each, every 4-s window with a 3-s hop), up to
    ``max_embeddings`` of them; saved as a ``melody_rvq`` artifact when ``out_dir`` is given."""
    was_training = embedder.training
    embedder.eval()
    device = next(embedder.parameters()).device
    embeddings: list[torch.Tensor] = []
    count = 0
    for wav in wav_batches:
        wav = torch.as_tensor(np.asarray(wav) if not torch.is_tensor(wav) else wav, dtype=torch.float32)
        if wav.dim() == 1:
            wav = wav.unsqueeze(0)  # [1, T]
        emb = embedder.embed(wav.to(device)).flatten(0, 1).float().cpu()  # [B, Fm, D] -> [B * Fm, D]
        embeddings.append(emb)
        count += emb.shape[0]
        if max_embeddings is not None and count >= max_embeddings:
            break
    embedder.train(was_training)
    if not embeddings:
        raise ValueError("no audio to fit the melody RVQ on")
    x = torch.cat(embeddings)[:max_embeddings]  # [N, D]
    c = embedder.config
    rvq = ResidualVQ(x.shape[1], num_quantizers or c.rvq_codebooks, codebook_size or c.rvq_codebook_size)
    rvq.fit(x, iters=iters, seed=seed).eval()
    if out_dir is not None:
        preset = preset or embedder.preset
        if preset is None:
            raise ValueError(
                "fit_melody_rvq needs the preset of the melody embedder to record in the artifact"
            )
        save_melody_rvq(
            rvq,
            out_dir,
            preset,
            meta={"embeddings": int(x.shape[0]), "iters": iters, "seed": seed, **(meta or {})},
        )
    return rvq


def save_random_melody(ckpt_dir: str | Path, preset: str = "tiny", seed: int = 0) -> dict[str, str]:
    """Write ``melody/`` (an *untrained* embedder of ``preset``) and ``melody_rvq/`` (fitted on its
    embeddings of a few noisy tones) into a tokenizer folder: for pipeline tests and benchmarks, like
    ``bundle.save_random_tokenizers``. Returns the artifact ids."""
    ckpt = Path(ckpt_dir)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t = np.arange(int(5 * SAMPLE_RATE)) / SAMPLE_RATE  # 5-s clips of noisy gliding tones: [8, 120000]
    audio = np.stack(
        [
            0.3 * np.sin(2 * np.pi * rng.uniform(150, 900) * t * (1 + rng.uniform(-0.05, 0.05) * t))
            + 0.05 * rng.standard_normal(t.shape)
            for _ in range(8)
        ]
    ).astype(np.float32)
    embedder = MelodyEmbedder(MelodyConfig.preset(preset)).eval()
    embedder.preset = preset
    meta = {"untrained": True, "seed": seed}
    save_melody(embedder, ckpt / "melody", preset, meta=meta)
    fit_melody_rvq(embedder, [torch.from_numpy(audio)], ckpt / "melody_rvq", iters=2, seed=seed, meta=meta)
    return {name: artifact_id(ckpt / name) for name in MELODY_FOLDERS}
