"""Training MuLan's towers contrastively on (audio crop, caption) pairs (Huang et al., 2022).

The loss is CLIP's symmetric InfoNCE over the batch with a learned temperature: every crop must pick its
caption among the batch's captions and every caption its crop. Captions that occur twice in a batch are
both right answers (the targets spread over them) rather than false negatives.

The text tower is frozen by default, so its pooled output is a deterministic function of the caption
string: it is computed once per distinct caption and cached, which leaves only the audio tower and the
two projections to run per step — what makes the tiny preset train in a couple of CPU minutes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from musiclm.constants import SAMPLE_RATE
from musiclm.tokenizers.mulan import MuLan, MuLanConfig, save_mulan
from musiclm.training.w2vbert_learner import random_crops, worker_rank

log = logging.getLogger(__name__)

DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"lr": 2e-3, "batch_size": 16, "crop_seconds": 5.0, "weight_decay": 0.01},
    "paper": {"lr": 1e-4, "batch_size": 64, "crop_seconds": 10.0, "weight_decay": 0.01},
}


def same_caption(captions: list[str]) -> torch.Tensor:
    """bool [B, B]: True where two rows of the batch share their caption (the diagonal included)."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    x = torch.tensor([ids[c] for c in captions])
    return x[:, None] == x[None, :]


def contrastive_loss(audio: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised ``audio`` [B, D] and ``text`` [B, D]; ``same`` [B, B] marks positives."""
    logits = scale * text @ audio.T  # [B text, B audio]
    targets = same.to(logits.dtype) / same.sum(1, keepdim=True)  # [B, B], rows sum to 1
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T))


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
        config: MuLanConfig | None = None,
    ):
        self.preset = preset
        self.config = config or MuLanConfig.preset(preset)
        defaults = DEFAULTS[preset]
        self.lr = lr if lr is not None else defaults["lr"]
        self.batch_size = batch_size if batch_size is not None else defaults["batch_size"]
        crop_seconds = crop_seconds if crop_seconds is not None else defaults["crop_seconds"]
        self.crop_samples = int(crop_seconds * SAMPLE_RATE)
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.module = MuLan(self.config).to(self.device)
        self.module.preset = preset
        self.model = wrap_model(self.module)
        wd = weight_decay if weight_decay is not None else defaults["weight_decay"]
        decay = [p for n, p in self.module.named_parameters() if p.requires_grad and p.dim() > 1]
        no_decay = [p for n, p in self.module.named_parameters() if p.requires_grad and p.dim() <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=self.lr,
            fused=True,  # one kernel instead of a loop over tensors (much faster on CPU)
        )
        self.step = 0
        self.rng = np.random.default_rng([seed, worker_rank()])
        self.skipped_no_caption = 0
        self._text_cache: dict[str, torch.Tensor] = {}

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
        """Pooled text-tower outputs [B, H]; cached per caption while the tower is frozen."""
        tower = self.module.text_tower
        if tower.trainable:
            return tower(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:
            with torch.no_grad():
                for caption, feature in zip(missing, tower(missing)):
                    self._text_cache[caption] = feature.cpu()
        return torch.stack([self._text_cache[c] for c in captions]).to(self.device)  # [B, H]

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: dict[str, Any] | None) -> dict[str, float]:
        if batch is None:
            return {}
        self.model.train()
        same = same_caption(batch["captions"]).to(self.device)
        audio, text, scale = self.model(batch["wav"].to(self.device), self.text_features(batch["captions"]))
        loss = contrastive_loss(audio, text, scale, same)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return {"loss": float(loss.detach()), "logit_scale": float(scale.detach()), "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def eval_step(self, batch: dict[str, Any] | None) -> dict[str, float]:
        """Loss and text -> audio recall@1/@5 within the batch, next to their chance levels 1/B and 5/B."""
        if batch is None:
            return {}
        self.model.eval()
        same = same_caption(batch["captions"]).to(self.device)
        audio, text, scale = self.model(batch["wav"].to(self.device), self.text_features(batch["captions"]))
        self.model.train()
        B = audio.shape[0]
        return {
            "loss": float(contrastive_loss(audio, text, scale, same)),
            "r1": retrieval_recall(audio, text, same, 1),
            "r5": retrieval_recall(audio, text, same, 5),
            "chance_r1": min(1.0, 1 / B),
            "chance_r5": min(1.0, 5 / B),
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
