"""Semantic tokens S: a w2v-BERT conformer and k-means over one of its layers (AudioLM / MusicLM §3.1).

w2v-BERT (Chung et al., 2021) pretrains a conformer with two objectives at once:

* the *contrastive module* (a linear projection, then the first conformer blocks) sees the feature
  encoder's output with spans replaced by random vectors and must pick, at every masked frame, the
  quantized version of the true (unmasked) feature among distractors — the wav2vec 2.0 task; a learned
  Gumbel-softmax quantizer on the unmasked features provides those targets and a code id per frame;
* the *MLM module* (the remaining blocks) reads the contrastive module's output and predicts, at the masked
  frames, the quantizer's code ids (BERT-style masked prediction).

The ``tiny`` preset swaps the learned Gumbel quantizer for an EMA k-means codebook over the log-mel frames
(HuBERT's first-iteration targets): a Gumbel codebook needs thousands of updates to leave its random or
collapsed start, which a model trained for two CPU minutes does not get.

MusicLM takes the embeddings of the MLM module's 7th layer of a 600M-parameter w2v-BERT and quantizes them
with k-means (1024 centroids) into 25 tokens per second. Here a 100 Hz log-mel front end is subsampled ×4 by
a convolution stack, so one token covers ``SEMANTIC_HOP`` = 960 samples and ``F = T // 960`` exactly.

The losses live in ``musiclm.training.w2vbert_learner``: this module only defines the network and the
tokenizer that wraps it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musiclm.audio import MelSpectrogram
from musiclm.checkpoint import config_from_dict, load_artifact, load_weights, save_artifact
from musiclm.constants import SAMPLE_RATE, SEMANTIC_CODEBOOK_SIZE, SEMANTIC_FRAME_RATE, SEMANTIC_HOP
from musiclm.tokenizers.kmeans import KMeans
from musiclm.tokenizers.rvq import VectorQuantizer

MEL_HOP = SEMANTIC_HOP // 4  # 240 samples = 10 ms: the conv subsampler divides the frame rate by 4

PRESETS = ("tiny", "paper")


@dataclass
class W2VBertConfig:
    """w2v-BERT sizes. Defaults are the ~600M-parameter model MusicLM uses (w2v-BERT XL: 24 conformer
    layers of width 1024, 8 heads, kernel 5, 12 contrastive + 12 MLM, features from the 7th MLM layer;
    637M here with the relative-position projections and the conv front end)."""

    sample_rate: int = SAMPLE_RATE
    n_mels: int = 64
    n_fft: int = 600  # 25-ms analysis window at 24 kHz
    subsampler_channels: int = 1024
    dim: int = 1024
    heads: int = 8
    ff_mult: int = 4
    conv_kernel: int = 5
    contrastive_layers: int = 12
    mlm_layers: int = 12
    dropout: float = 0.1
    # quantizer of the contrastive module: "gumbel" (one learned Gumbel-softmax codebook on the conv features,
    # as in w2v-BERT and wav2vec 2.0) or "vq" (an EMA k-means codebook on the log-mel frames the conv stack
    # reads, HuBERT's first-iteration targets: they cannot collapse, which a model trained for minutes needs)
    quantizer: str = "gumbel"
    codebook_size: int = 1024
    code_dim: int = 1024
    final_dim: int = 768  # space in which contexts and quantized targets are compared
    gumbel_temperature: tuple = (2.0, 0.5, 0.999995)  # (start, floor, decay per update)
    # masking (wav2vec 2.0 / w2v-BERT): each frame starts a span of `mask_span` with probability `mask_prob`
    mask_prob: float = 0.065
    mask_span: int = 10
    # contrastive task
    num_negatives: int = 100
    contrastive_temperature: float = 0.1
    diversity_weight: float = 0.1
    # features for the semantic tokens: 1-based index of an MLM layer
    feature_layer: int = 7
    # what masked frames are replaced with: "random" vectors (w2v-BERT) or one "learned" vector (wav2vec 2.0)
    mask_with: str = "random"

    @classmethod
    def preset(cls, name: str) -> W2VBertConfig:
        if name == "paper":
            return cls()
        if name == "tiny":
            # ~1M parameters: trains in a couple of CPU minutes; features from the first of two MLM layers
            # (the "middle" of the MLM stack, as the 7th of 12 is in the paper).
            return cls(
                subsampler_channels=32,
                dim=128,
                heads=4,
                conv_kernel=7,
                contrastive_layers=2,
                mlm_layers=2,
                dropout=0.0,
                quantizer="vq",
                codebook_size=256,
                code_dim=256,  # 4 stacked 64-bin log-mel frames
                final_dim=128,
                gumbel_temperature=(2.0, 0.5, 0.995),
                num_negatives=20,
                feature_layer=1,
            )
        raise ValueError(f"unknown W2VBert preset {name!r}; valid presets: {', '.join(PRESETS)}")

    def __post_init__(self) -> None:
        if not 1 <= self.feature_layer <= self.mlm_layers:
            raise ValueError(f"feature_layer must be an MLM layer in [1, {self.mlm_layers}], got {self.feature_layer}")
        if self.quantizer not in ("gumbel", "vq"):
            raise ValueError(f"quantizer must be 'gumbel' or 'vq', got {self.quantizer!r}")
        if self.quantizer == "vq" and self.code_dim != 4 * self.n_mels:
            raise ValueError(f"the 'vq' quantizer codes 4 stacked log-mel frames: code_dim must be {4 * self.n_mels}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.mask_with not in ("random", "learned"):
            raise ValueError(f"mask_with must be 'random' or 'learned', got {self.mask_with!r}")


class ConvSubsampler(nn.Module):
    """Log-mel at 100 Hz -> conformer input at 25 Hz: two stride-2 3×3 convolutions over (mel, time).

    The mel frames are first cut to a multiple of 4 so that the output has exactly ``T // 960`` frames.
    """

    def __init__(self, config: W2VBertConfig):
        super().__init__()
        c = config.subsampler_channels
        self.mel = MelSpectrogram(config.sample_rate, config.n_fft, MEL_HOP, config.n_mels)
        self.conv = nn.Sequential(
            nn.Conv2d(1, c, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(c, c, 3, stride=2, padding=1),
            nn.GELU(),
        )
        mel_out = math.ceil(math.ceil(config.n_mels / 2) / 2)
        self.proj = nn.Linear(c * mel_out, config.dim)
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wav [B, T] -> (features [B, F, D], the log-mel frames each feature covers [B, F, 4 * n_mels])."""
        if wav.shape[-1] < SEMANTIC_HOP:
            raise ValueError(f"audio of {wav.shape[-1]} samples is shorter than one semantic frame ({SEMANTIC_HOP})")
        mel = self.mel(wav)  # [B, n_mels, T // 240]
        frames = mel.shape[-1] // 4
        mel = mel[..., : frames * 4]  # [B, n_mels, 4F]
        x = self.conv(mel.unsqueeze(1))  # [B, C, n_mels / 4, F]
        x = x.permute(0, 3, 1, 2).flatten(2)  # [B, F, C * n_mels / 4]
        stacked = mel.transpose(1, 2).reshape(mel.shape[0], frames, -1)  # [B, 4F, n_mels] -> [B, F, 4 * n_mels]
        return self.norm(self.proj(x)), stacked


class FeedForward(nn.Module):
    """The conformer's macaron half-step feed-forward (LN, expand, Swish, project)."""

    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * mult),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(dim * mult, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def relative_positions(frames: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embeddings of the relative distances ``frames - 1, ..., 0, ..., -(frames - 1)``: ``[2F - 1, dim]``."""
    distance = torch.arange(frames - 1, -frames, -1, device=device, dtype=torch.float32)  # [2F - 1]
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = distance[:, None] * inv_freq[None, :]  # [2F - 1, dim / 2]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1).to(dtype)  # [2F - 1, dim]


class SelfAttention(nn.Module):
    """Pre-LN multi-head self-attention with the conformer's relative sinusoidal positional encoding
    (Transformer-XL; Gulati et al., 2020): the score of query i and key j adds a content term
    ``(q_i + u) . k_j`` and a position term ``(q_i + v) . W p_{i-j}``: attention knows how far apart two
    frames are, never where a crop starts.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, dim // heads))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, dim // heads))
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x [B, T, D]; pos_emb [2T - 1, D] from :func:`relative_positions`."""
        B, T, D = x.shape
        H, Dh = self.heads, D // self.heads
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)  # 3 × [B, T, D]
        q, k, v = (t.view(B, T, H, Dh).transpose(1, 2) for t in (q, k, v))  # [B, H, T, Dh]
        p = self.pos(pos_emb).view(2 * T - 1, H, Dh).transpose(0, 1)  # [H, 2T - 1, Dh]
        scores = torch.einsum("bhtd,hrd->bhtr", q + self.pos_bias_v[:, None], p)  # [B, H, T, 2T - 1]
        # query i, key j sit at distance i - j, column T - 1 - i + j of row i: Transformer-XL's shift (pad a
        # column, fold rows, drop the first) moves every row into place without a gather
        scores = F.pad(scores, (1, 0)).view(B, H, 2 * T, T)[:, :, 1:]  # [B, H, 2T - 1, T]
        position = scores.reshape(B, H, T, 2 * T - 1)[..., :T]  # [B, H, T, T]
        y = F.scaled_dot_product_attention(
            q + self.pos_bias_u[:, None], k, v, attn_mask=position / math.sqrt(Dh),
            dropout_p=self.dropout if self.training else 0.0,
        )  # [B, H, T, Dh]
        y = y.transpose(1, 2).reshape(B, T, D)  # [B, T, D]
        return F.dropout(self.out(y), self.dropout, self.training)


class ConvModule(nn.Module):
    """Conformer convolution module: pointwise + GLU, depthwise conv over time, norm, Swish, pointwise.

    LayerNorm stands in for the original BatchNorm so that eval matches train whatever the batch size.
    """

    def __init__(self, dim: int, kernel: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Conv1d(dim, 2 * dim, 1)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.mid_norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Conv1d(dim, dim, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x).transpose(1, 2)  # [B, D, T]
        y = F.glu(self.pointwise_in(y), dim=1)  # [B, D, T]
        y = self.depthwise(y)  # [B, D, T]
        y = F.silu(self.mid_norm(y.transpose(1, 2))).transpose(1, 2)  # [B, D, T]
        return self.dropout(self.pointwise_out(y).transpose(1, 2))  # [B, T, D]


class ConformerBlock(nn.Module):
    """FF/2, MHSA, conv module, FF/2, LayerNorm — each sub-block residual (Gulati et al., 2020)."""

    def __init__(self, config: W2VBertConfig):
        super().__init__()
        d, p = config.dim, config.dropout
        self.ff1 = FeedForward(d, config.ff_mult, p)
        self.attn = SelfAttention(d, config.heads, p)
        self.conv = ConvModule(d, config.conv_kernel, p)
        self.ff2 = FeedForward(d, config.ff_mult, p)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, pos_emb)
        x = x + self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.norm(x)


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # [B, F, code_dim] the chosen code vectors (straight-through when training)
    codes: torch.Tensor  # [B, F] long, the MLM targets
    avg_probs: torch.Tensor  # [V] softmax probabilities averaged over frames (for the diversity loss)


class GumbelQuantizer(nn.Module):
    """The contrastive module's learned quantizer: a Gumbel-softmax choice among ``codebook_size`` codes.

    Training samples a hard one-hot with straight-through gradients at ``temperature`` (annealed by the
    learner); eval takes the argmax. The chosen index is the MLM target id.
    """

    def __init__(self, dim: int, codebook_size: int, code_dim: int):
        super().__init__()
        self.logits = nn.Linear(dim, codebook_size)
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim) / math.sqrt(code_dim))
        self.temperature = 2.0

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        logits = self.logits(x).float()  # [B, F, V]
        if self.training:
            onehot = F.gumbel_softmax(logits, tau=self.temperature, hard=True)  # [B, F, V]
        else:
            onehot = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)  # [B, F, V]
        quantized = onehot @ self.codebook  # [B, F, code_dim]
        avg_probs = logits.softmax(-1).flatten(0, 1).mean(0)  # [V]
        return QuantizerOutput(quantized, onehot.argmax(-1), avg_probs)


class VQTargetQuantizer(nn.Module):
    """The alternative quantizer: nearest code of an EMA-learned codebook (k-means init on the first batch,
    dead codes restarted) over the normalised log-mel frames under each feature — online k-means of the
    input, as HuBERT's first iteration. The targets are a fixed function of the audio, so neither loss can
    make them collapse; no diversity loss is needed."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.vq = VectorQuantizer(dim, codebook_size)
        self.temperature = 0.0  # no Gumbel sampling; kept so the learner can treat both quantizers alike

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        x = F.layer_norm(x.float(), x.shape[-1:])  # per-frame standardised log-mel [B, F, 4 * n_mels]
        quantized, codes, _ = self.vq(x)  # [B, F, 4 * n_mels], [B, F]
        avg_probs = torch.bincount(codes.flatten(), minlength=self.vq.codebook_size).float()  # [V]
        return QuantizerOutput(quantized.detach(), codes, avg_probs / avg_probs.sum())


class ContrastiveModule(nn.Module):
    """Masking, a linear projection, then conformer blocks (w2v-BERT's contrastive module, less the
    quantizer, which reads the unmasked features). Masked frames become random vectors (w2v-BERT) of the
    features' scale — LayerNorm'd, so unit variance — or wav2vec 2.0's one learned vector."""

    def __init__(self, config: W2VBertConfig):
        super().__init__()
        self.mask_with = config.mask_with
        if config.mask_with == "learned":
            self.mask_embedding = nn.Parameter(torch.randn(config.dim) * 0.02)
        self.projection = nn.Linear(config.dim, config.dim)
        self.blocks = nn.ModuleList(ConformerBlock(config) for _ in range(config.contrastive_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            fill = torch.randn_like(x) if self.mask_with == "random" else self.mask_embedding.to(x.dtype)
            x = torch.where(mask.unsqueeze(-1), fill, x)  # [B, F, D]
        x = self.projection(x)
        pos_emb = relative_positions(x.shape[1], x.shape[2], x.device, x.dtype)  # [2F - 1, D]
        for block in self.blocks:
            x = block(x, pos_emb)
        return x


class MLMModule(nn.Module):
    """Conformer blocks on the contrastive module's output, with a head predicting quantizer code ids."""

    def __init__(self, config: W2VBertConfig):
        super().__init__()
        self.blocks = nn.ModuleList(ConformerBlock(config) for _ in range(config.mlm_layers))
        self.head = nn.Linear(config.dim, config.codebook_size)

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Hidden states after ``upto`` blocks (all if None)."""
        pos_emb = relative_positions(x.shape[1], x.shape[2], x.device, x.dtype)  # [2F - 1, D]
        for block in self.blocks[:upto]:
            x = block(x, pos_emb)
        return x


class W2VBertOutput(NamedTuple):
    contexts: torch.Tensor  # [B, F, final_dim] contrastive module output, projected
    targets: torch.Tensor  # [B, F, final_dim] quantized unmasked features, projected
    codes: torch.Tensor  # [B, F] long quantizer ids (MLM targets)
    mlm_logits: torch.Tensor  # [B, F, V]
    avg_probs: torch.Tensor  # [V]
    mask: torch.Tensor  # [B, F] bool


class W2VBert(nn.Module):
    """Conv subsampler -> contrastive module (+ quantizer) -> MLM module."""

    def __init__(self, config: W2VBertConfig):
        super().__init__()
        self.config = config
        self.subsampler = ConvSubsampler(config)
        if config.quantizer == "gumbel":
            self.quantizer = GumbelQuantizer(config.dim, config.codebook_size, config.code_dim)
        else:
            self.quantizer = VQTargetQuantizer(config.code_dim, config.codebook_size)
        self.contrastive = ContrastiveModule(config)
        self.mlm = MLMModule(config)
        self.project_contexts = nn.Linear(config.dim, config.final_dim)
        self.project_targets = nn.Linear(config.code_dim, config.final_dim)
        self.apply(_init_weights)
        # code logits of a few units: large enough that a frame's code depends on the frame more than on the
        # Gumbel noise (std 1.3), small enough that the softmax is not saturated (the diversity loss and
        # the straight-through gradient would vanish)
        if config.quantizer == "gumbel":
            nn.init.normal_(self.quantizer.logits.weight, std=0.25)
        self.preset: str | None = None  # set by load_w2vbert / the learner, recorded in the k-means artifact

    def num_frames(self, num_samples: int) -> int:
        return num_samples // SEMANTIC_HOP

    @property
    def feature_dim(self) -> int:
        return self.config.dim

    def forward(self, wav: torch.Tensor, mask: torch.Tensor) -> W2VBertOutput:
        """Everything the w2v-BERT losses need. ``wav`` [B, T]; ``mask`` bool [B, T // 960]."""
        x, mel = self.subsampler(wav)  # [B, F, D], [B, F, 4 * n_mels]
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the {tuple(x.shape[:2])} frames")
        q = self.quantizer(x if self.config.quantizer == "gumbel" else mel)
        c = self.contrastive(x, mask)  # [B, F, D]
        h = self.mlm(c)  # [B, F, D]
        return W2VBertOutput(
            contexts=self.project_contexts(c),
            targets=self.project_targets(q.quantized),
            codes=q.codes,
            mlm_logits=self.mlm.head(h),
            avg_probs=q.avg_probs,
            mask=mask,
        )

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """Unmasked embeddings of MLM layer ``feature_layer``: wav [B, T] -> [B, T // 960, D] at 25 Hz."""
        x = self.contrastive(self.subsampler(wav)[0])  # [B, F, D]
        return self.mlm(x, upto=self.config.feature_layer)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def compute_span_mask(
    batch: int, frames: int, prob: float, span: int, rng: np.random.Generator, min_spans: int = 1
) -> torch.Tensor:
    """wav2vec 2.0 / w2v-BERT masking: each frame starts a masked span of ``span`` frames with probability
    ``prob`` (spans may overlap); at least ``min_spans`` spans per row so every row has a masked frame.
    Returns bool [batch, frames]."""
    mask = np.zeros((batch, frames), dtype=bool)
    span = min(span, frames)
    for b in range(batch):
        starts = np.flatnonzero(rng.random(frames - span + 1) < prob)
        if len(starts) < min_spans:
            starts = rng.choice(frames - span + 1, size=min(min_spans, frames - span + 1), replace=False)
        for s in starts:
            mask[b, s : s + span] = True
    return torch.from_numpy(mask)


def count_parameters(config: W2VBertConfig) -> int:
    """Parameter count without allocating the weights (built on the meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in W2VBert(config).parameters())


# --------------------------------------------------------------------------- the tokenizer


class SemanticTokenizer(nn.Module):
    """Features quantized by k-means: wav [B, T] -> long [B, T // 960] at 25 Hz.

    ``w2vbert`` is our W2VBert or any feature model with ``features(wav) -> [B, T // 960, D]`` and
    ``feature_dim`` (the pretrained HuBERT / w2v-BERT 2.0 adapters)."""

    frame_rate = SEMANTIC_FRAME_RATE

    def __init__(self, w2vbert: nn.Module, kmeans: KMeans):
        super().__init__()
        if kmeans.centroids.shape[-1] != w2vbert.feature_dim:
            raise ValueError(
                f"k-means centroids have dim {kmeans.centroids.shape[-1]}, the features {w2vbert.feature_dim}"
            )
        self.w2vbert = w2vbert
        self.kmeans = kmeans

    @property
    def codebook_size(self) -> int:
        return self.kmeans.centroids.shape[0]

    @torch.no_grad()
    def features(self, wav: torch.Tensor) -> torch.Tensor:
        return self.w2vbert.features(wav)

    @torch.no_grad()
    def tokens(self, wav: torch.Tensor) -> torch.Tensor:
        return self.kmeans.assign(self.features(wav)).long()  # [B, F]


def save_w2vbert(model: W2VBert, out_dir: str | Path, preset: str, meta: dict | None = None) -> Path:
    return save_artifact(out_dir, kind="w2vbert", preset=preset, config=model.config, state_dict=model.state_dict(), meta=meta)


def load_w2vbert(path: str | Path, preset: str | None = None) -> W2VBert:
    document, weights = load_artifact(path, kind="w2vbert", preset=preset)
    model = W2VBert(config_from_dict(W2VBertConfig, document["config"]))
    load_weights(model, weights, path)
    model.preset = document["preset"]
    return model.eval()


def save_kmeans(kmeans: KMeans, out_dir: str | Path, preset: str, meta: dict | None = None) -> Path:
    k, dim = kmeans.centroids.shape
    return save_artifact(
        out_dir,
        kind="semantic_kmeans",
        preset=preset,
        config={"k": int(k), "dim": int(dim)},
        state_dict=kmeans.state_dict(),
        meta=meta,
    )


def load_kmeans(path: str | Path, preset: str | None = None) -> KMeans:
    document, weights = load_artifact(path, kind="semantic_kmeans", preset=preset)
    cfg = document["config"]
    kmeans = KMeans(cfg["k"], cfg["dim"])
    load_weights(kmeans, weights, path)
    return kmeans.eval()


def load_semantic_tokenizer(
    w2vbert_dir: str | Path, kmeans_dir: str | Path, preset: str | None = None
) -> SemanticTokenizer:
    return SemanticTokenizer(load_w2vbert(w2vbert_dir, preset), load_kmeans(kmeans_dir, preset)).eval()


@torch.no_grad()
def fit_semantic_kmeans(
    w2vbert: W2VBert,
    wav_batches: Iterable[torch.Tensor],
    k: int = SEMANTIC_CODEBOOK_SIZE,
    out_dir: str | Path | None = None,
    preset: str | None = None,
    iters: int = 50,
    seed: int = 0,
) -> KMeans:
    """Fit the k-means of the semantic tokens on w2v-BERT features of every frame of ``wav_batches``
    (tensors [B, T] or arrays), and save it as a ``semantic_kmeans`` artifact when ``out_dir`` is given
    (``preset`` defaults to the one ``load_w2vbert`` read)."""
    was_training = w2vbert.training
    w2vbert.eval()
    device = next(w2vbert.parameters()).device
    frames = []
    for wav in wav_batches:
        wav = torch.as_tensor(np.asarray(wav) if not torch.is_tensor(wav) else wav, dtype=torch.float32)
        if wav.dim() == 1:
            wav = wav.unsqueeze(0)  # [1, T]
        frames.append(w2vbert.features(wav.to(device)).flatten(0, 1).cpu())  # [B * F, D]
    w2vbert.train(was_training)
    if not frames:
        raise ValueError("no audio to fit the semantic k-means on")
    x = torch.cat(frames)  # [N, D]
    if x.shape[0] < k:
        warnings.warn(
            f"only {x.shape[0]} feature frames for {k} centroids: surplus centroids are copies of data points",
            stacklevel=2,
        )
    kmeans = KMeans(k, x.shape[1])
    kmeans.fit(x, iters=iters, seed=seed)
    if out_dir is not None:
        preset = preset or w2vbert.preset
        if preset is None:
            raise ValueError("fit_semantic_kmeans needs the preset of the w2v-BERT model to record in the artifact")
        save_kmeans(kmeans, out_dir, preset, meta={"frames": int(x.shape[0]), "iters": iters, "seed": seed})
    return kmeans.eval()
