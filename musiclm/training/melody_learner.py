"""Training the melody embedder (MusicLM appendix C) with a semi-hard triplet loss (Schroff et al., 2015).

The data are audio shards whose sample ``json`` carries ``melody_group``: samples of one group are
renditions of one melody (other instruments, accompaniment keys, tempi, hummed or whistled). The
embedder must put renditions of a melody close together and other melodies far apart, whatever the
acoustics, which is what the triplet loss asks: for an anchor ``a``, a positive ``p`` (same melody) and
a negative ``n`` (another melody), ``d(a, p) + margin <= d(a, n)`` with ``d`` the squared distance of
the L2-normalised embeddings (in [0, 4]).

Triplets are mined in the batch, as in FaceNet: every (anchor, positive) pair of the batch is used, with
the *semi-hard* negative: the closest negative that is still farther from the anchor than the positive
(hard enough to teach something, not so hard that it pulls the model to a collapsed solution early); when
every negative is closer than the positive, the hardest (closest) negative.

Which rows are positives of each other. Two samples are renditions of the same melody *segment* when they
share ``melody_group`` and the window start (``json["start"]``): a long recording cut into several
windows by ``musiclm prepare`` gives windows with other parts of the melody, which must not be positives.
The 4-s crops of a batch are random, but all rows of one segment are cropped at the same relative position
of their window, so that the renditions' crops hold the same notes (up to the renditions' tempo
differences).

Batches. Mining needs several renditions of a melody in one batch. The learner uses what the loader gives:
the runner reads shards through a shuffle buffer (``shuffle``, 256 samples by default), so a batch of B
samples from a corpus of N samples with R renditions per melody gives a row a positive with probability
about ``1 - (1 - (R - 1) / (N - 1)) ** (B - 1)``. Shuffle (never feed group-sorted shards unshuffled),
and prefer large batches and several renditions per melody; with several Ray workers the embeddings of
all workers are gathered and mined as one global batch. Rows without a positive in the batch still serve
as negatives; the metric ``anchors`` says which fraction of rows had a positive. Samples without a
``melody_group`` are skipped, and the count is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from musiclm.constants import SAMPLE_RATE
from musiclm.tokenizers.melody import MelodyConfig, MelodyEmbedder, save_melody
from musiclm.training.mulan_learner import caption_ids, gather_rows, world_size
from musiclm.training.w2vbert_learner import worker_rank

log = logging.getLogger(__name__)

DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"lr": 1e-3, "batch_size": 32, "weight_decay": 0.01, "warmup_steps": 10, "margin": 0.2},
    "paper": {"lr": 1e-4, "batch_size": 64, "weight_decay": 0.05, "warmup_steps": 2000, "margin": 0.2},
}
_FAR = 1e4  # a distance larger than any between unit vectors (squared distances are at most 4)


# ----------------------------------------------------------------------------- mining and metrics


def segment_ids(groups: list[str], starts: list[float]) -> torch.Tensor:
    """long [B]: a stable 63-bit id of each row's (melody_group, window start): rows with equal ids are
    renditions of the same melody segment (equal on every worker: what the workers exchange)."""
    return caption_ids([f"{g}\x1f{round(float(s) * 1000)}" for g, s in zip(groups, starts)])


def squared_distances(emb: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` unit vectors -> ``[N, N]`` squared Euclidean distances (``2 - 2 cos``, clamped at 0)."""
    return (2.0 - 2.0 * emb @ emb.T).clamp_min(0.0)


def semi_hard_triplet_loss(
    emb: torch.Tensor, ids: torch.Tensor, margin: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """FaceNet's triplet loss with semi-hard negatives mined in the batch.

    ``emb`` [N, D] (L2-normalised), ``ids`` [N] (equal ids: same melody segment). For every (anchor a,
    positive p != a) pair whose anchor has a negative in the batch: the negative n with the smallest
    ``d(a, n)`` among those with ``d(a, n) > d(a, p)``, else the smallest ``d(a, n)`` overall; the loss is the
    mean of ``relu(d(a, p) - d(a, n) + margin)``. Returns (loss, stats): ``pairs`` (number of pairs),
    ``active`` (fraction with a non-zero loss), ``semi_hard`` (fraction whose negative was semi-hard);
    a batch without pairs gives a zero loss that still depends on ``emb`` (and zero stats).
    """
    d = squared_distances(emb)  # [N, N]
    n = emb.shape[0]
    same = ids[:, None] == ids[None, :]  # [N, N]
    eye = torch.eye(n, dtype=torch.bool, device=emb.device)
    negative = ~same  # [a, n]
    pairs = same & ~eye & negative.any(dim=1, keepdim=True)  # [a, p] with at least one negative for a
    if not bool(pairs.any()):
        return 0.0 * emb.sum(), {"pairs": 0.0, "active": 0.0, "semi_hard": 0.0}
    d_ap = d.unsqueeze(2)  # [a, p, 1]
    d_an = d.unsqueeze(1)  # [a, 1, n]
    farther = (d_an > d_ap) & negative.unsqueeze(1)  # [a, p, n]: negatives still farther than the positive
    semi = torch.where(farther, d_an, torch.full_like(d_an, _FAR)).amin(dim=2)  # [a, p]
    hardest = torch.where(negative, d, torch.full_like(d, _FAR)).amin(dim=1, keepdim=True)  # [a, 1]
    has_semi = farther.any(dim=2)  # [a, p]
    chosen = torch.where(has_semi, semi, hardest.expand_as(semi))  # [a, p]
    losses = torch.relu(d - chosen + margin)[pairs]  # [pairs]
    stats = {
        "pairs": float(pairs.sum()),
        "active": float((losses > 0).float().mean()),
        "semi_hard": float(has_semi[pairs].float().mean()),
    }
    return losses.mean(), stats


def retrieval_metrics(emb: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Same-melody retrieval in the batch, over the rows that have a positive (another row of their id):

    * ``r1``: the row's nearest other row is a positive (recall@1);
    * ``chance_r1``: what a random ranking gives, the mean over those rows of ``m / (N - 1)`` (m positives);
    * ``triplet_acc``: the fraction of all triplets (a, p, n) with ``d(a, p) < d(a, n)``;
    * ``anchors``: the fraction of rows with a positive.
    Empty when no row has a positive."""
    d = squared_distances(emb)  # [N, N]
    n = emb.shape[0]
    same = ids[:, None] == ids[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=emb.device)
    positive = same & ~eye  # [N, N]
    rows = positive.any(dim=1)  # [N]
    if not bool(rows.any()):
        return {}
    nearest = d.masked_fill(eye, float("inf")).argmin(dim=1)  # [N]
    hit = positive.gather(1, nearest[:, None]).squeeze(1)  # [N]
    triplets = positive.unsqueeze(2) & (~same).unsqueeze(1)  # [a, p, n]
    correct = (d.unsqueeze(2) < d.unsqueeze(1)) & triplets
    metrics = {
        "r1": float(hit[rows].float().mean()),
        "chance_r1": float((positive.sum(1)[rows].float() / (n - 1)).mean()),
        "anchors": float(rows.float().mean()),
    }
    if bool(triplets.any()):
        metrics["triplet_acc"] = float(correct.sum() / triplets.sum())
    return metrics


def aligned_crops(
    wavs: list[np.ndarray], ids: list[int], length: int, rng: np.random.Generator
) -> torch.Tensor:
    """One ``length``-sample crop per clip -> ``[B, length]``; clips of one id are cropped at the same
    relative position of their clip (one uniform draw per id), so renditions' crops hold the same notes.
    Clips shorter than ``length`` are zero-padded at the end."""
    position = {i: float(rng.random()) for i in dict.fromkeys(ids)}
    out = np.zeros((len(wavs), length), dtype=np.float32)
    for row, (wav, i) in enumerate(zip(wavs, ids)):
        start = int(position[i] * max(0, len(wav) - length))
        piece = wav[start : start + length]
        out[row, : len(piece)] = piece
    return torch.from_numpy(out)  # [B, length]


# ----------------------------------------------------------------------------- the learner


class MelodyLearner:
    """Learner (docs/interfaces.md) of the melody embedder; exports kind ``melody``."""

    kind = "melody"
    shard_kind = "audio"
    default_max_steps = {"tiny": 300, "paper": 200_000}

    def __init__(
        self,
        preset: str,
        device: torch.device,
        wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
        *,
        lr: float | None = None,
        batch_size: int | None = None,
        crop_seconds: float | None = None,
        margin: float | None = None,
        weight_decay: float | None = None,
        warmup_steps: int | None = None,
        seed: int = 0,
        config: MelodyConfig | None = None,
    ):
        """``crop_seconds``: training crop (default and at most the 4-s window); ``margin``: the triplet
        margin on squared distances of unit vectors (FaceNet's 0.2 by default); ``warmup_steps``: linear
        learning-rate warm-up."""
        if preset not in DEFAULTS:
            raise ValueError(f"unknown melody preset {preset!r}; valid presets: {', '.join(DEFAULTS)}")
        self.preset = preset
        self.config = config or MelodyConfig.preset(preset)
        defaults = DEFAULTS[preset]
        self.lr = float(lr if lr is not None else defaults["lr"])
        self.batch_size = int(batch_size if batch_size is not None else defaults["batch_size"])
        self.margin = float(margin if margin is not None else defaults["margin"])
        self.warmup_steps = int(warmup_steps if warmup_steps is not None else defaults["warmup_steps"])
        crop_seconds = float(crop_seconds if crop_seconds is not None else self.config.window_seconds)
        if not 0 < crop_seconds <= self.config.window_seconds:
            raise ValueError(
                f"crop_seconds must be in (0, {self.config.window_seconds}] (one melody window), "
                f"got {crop_seconds}"
            )
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.batch_size < 2:
            raise ValueError(f"a triplet batch needs at least 2 samples, got batch_size={self.batch_size}")
        self.crop_samples = int(round(crop_seconds * SAMPLE_RATE))
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.module = MelodyEmbedder(self.config).to(self.device)
        self.module.preset = preset
        self.model = wrap_model(self.module)
        wd = float(weight_decay if weight_decay is not None else defaults["weight_decay"])
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() > 1], "weight_decay": wd},
                {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
            ],
            lr=self.lr,
            fused=True,
        )
        self.step = 0
        self.rng = np.random.default_rng([seed, worker_rank()])
        self.skipped_no_group = 0

    # ------------------------------------------------------------------ data
    def collate(self, samples: list[dict]) -> dict[str, Any] | None:
        """Aligned random crops (see the module docstring) of the samples that have a ``melody_group``;
        the others are skipped and counted."""
        wavs, groups, starts = [], [], []
        skipped = 0
        for s in samples:
            meta = s.get("json") or {}
            group = meta.get("melody_group")
            if group is None or group == "" or s.get("wav") is None:
                skipped += 1
                continue
            wavs.append(np.asarray(s["wav"], dtype=np.float32))
            groups.append(str(group))
            starts.append(float(meta.get("start") or 0.0))
        if skipped:
            self.skipped_no_group += skipped
            log.warning(
                "melody learner skipped %d sample(s) without melody_group in this batch (%d so far)",
                skipped,
                self.skipped_no_group,
            )
        if not wavs:
            return None
        ids = segment_ids(groups, starts)
        return {
            "wav": aligned_crops(wavs, ids.tolist(), self.crop_samples, self.rng),
            "ids": ids,
            "groups": groups,
        }

    def _placeholder_batch(self) -> dict[str, Any]:
        """One silent crop that takes part in the collectives (gather, DDP) but in no pair: for a worker
        whose batch held no usable sample."""
        return {
            "wav": torch.zeros(1, self.crop_samples),
            "ids": torch.zeros(1, dtype=torch.long),
            "placeholder": True,
        }

    def _embed(self, wav: torch.Tensor) -> torch.Tensor:
        """Crops ``[B, T]`` -> ``[B, 192]`` through the (possibly DDP-wrapped) model."""
        if wav.shape[1] < self.config.window_samples:
            wav = torch.nn.functional.pad(wav, (0, self.config.window_samples - wav.shape[1]))  # [B, window]
        return self.model(self.module.mel(wav.to(self.device)))

    def _lr(self) -> float:
        return self.lr * min(1.0, (self.step + 1) / max(1, self.warmup_steps))

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: dict[str, Any] | None) -> dict[str, float]:
        """One step of the semi-hard triplet loss over the (global) batch."""
        distributed = world_size() > 1
        if batch is None:
            if not distributed:
                return {}
            batch = self._placeholder_batch()
        self.model.train()
        emb = self._embed(batch["wav"])  # [B, D]
        keep = 0 if batch.get("placeholder") else emb.shape[0]
        emb, ids = emb[:keep], batch["ids"][:keep].to(self.device)
        if distributed:
            n = torch.tensor([keep], dtype=torch.long, device=self.device)
            counts = [torch.zeros_like(n) for _ in range(world_size())]
            torch.distributed.all_gather(counts, n)
            sizes = [int(c) for c in counts]
            emb, ids = gather_rows(emb, sizes, grad=True), gather_rows(ids, sizes, grad=False)  # [N, D], [N]
        loss, stats = semi_hard_triplet_loss(emb, ids, self.margin)
        if not stats["pairs"]:
            # no pair anywhere: a zero loss through every parameter keeps DDP's gradient hooks in step
            loss = loss + 0.0 * sum(p.sum() for p in self.module.parameters())
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        if stats["pairs"]:
            self.optimizer.step()
        self.step += 1
        ids_all = ids.detach()
        anchors = (
            float((ids_all[:, None] == ids_all[None, :]).sum(1).gt(1).float().mean()) if len(ids_all) else 0.0
        )
        return {
            "loss": float(loss.detach()),
            "grad_norm": float(grad_norm),
            "anchors": anchors,
            "global_batch": float(emb.shape[0]),
            **stats,
        }

    @torch.no_grad()
    def eval_step(self, batch: dict[str, Any] | None) -> dict[str, float]:
        """Triplet loss, triplet accuracy and same-melody recall@1 (with its chance level) in the batch;
        empty when no row of the batch has a positive."""
        if batch is None:
            return {}
        self.model.eval()
        emb = self._embed(batch["wav"])
        self.model.train()
        ids = batch["ids"].to(self.device)
        metrics = retrieval_metrics(emb, ids)
        if not metrics:
            return {}
        loss, stats = semi_hard_triplet_loss(emb, ids, self.margin)
        if stats["pairs"]:
            metrics["loss"] = float(loss)
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "skipped_no_group": self.skipped_no_group,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.skipped_no_group = int(state.get("skipped_no_group", 0))
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]

    def export(self, out_dir: str) -> None:
        save_melody(
            self.module,
            out_dir,
            self.preset,
            meta={
                "step": self.step,
                "crop_samples": self.crop_samples,
                "margin": self.margin,
                "skipped_no_group": self.skipped_no_group,
            },
        )
