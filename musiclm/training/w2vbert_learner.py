"""Training w2v-BERT, the model behind the semantic tokens (Chung et al., 2021).

One loss, two parts, as in the paper:

* contrastive (wav2vec 2.0): at every masked frame, the contrastive module's context must be closer (cosine,
  temperature 0.1) to the quantized unmasked feature of that frame than to ``K`` distractors — quantized
  features of other masked frames of the same crop — plus the codebook diversity loss (entropy of the
  average code distribution), weighted 0.1, so that the quantizer uses its whole codebook;
* masked LM: at every masked frame, the MLM module predicts the quantizer's code id (cross-entropy).

Total = contrastive + 0.1 · diversity + MLM. The Gumbel temperature of the quantizer is annealed per update.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from musiclm.constants import SAMPLE_RATE, SEMANTIC_HOP
from musiclm.tokenizers.semantic import W2VBert, W2VBertConfig, W2VBertOutput, compute_span_mask, save_w2vbert

log = logging.getLogger(__name__)

# training hyper-parameters per preset (options of the learner override them)
DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"lr": 1e-3, "batch_size": 8, "crop_seconds": 4.0, "warmup_steps": 30, "weight_decay": 0.01},
    "paper": {"lr": 5e-4, "batch_size": 32, "crop_seconds": 10.0, "warmup_steps": 25_000, "weight_decay": 0.01},
}


# --------------------------------------------------------------------------- losses


def contrastive_loss(
    out: W2VBertOutput,
    num_negatives: int,
    temperature: float,
    generator: torch.Generator,
    exclude_same_code: bool = False,
) -> torch.Tensor:
    """wav2vec 2.0's InfoNCE over masked frames, distractors drawn from the same crop's masked frames.

    A distractor with the positive's own code is the same target vector. wav2vec 2.0 excludes such
    distractors (``exclude_same_code``), which is right for fixed targets (the ``vq`` quantizer); with a
    *learned* single codebook repeats are frequent and excluding them would let a collapsed quantizer
    (one code for every frame) reach zero loss, so for ``gumbel`` they are kept and cost ``log(1 + repeats)``.
    """
    logits = []
    for b in range(out.mask.shape[0]):
        idx = out.mask[b].nonzero().squeeze(1)  # [M]
        M = idx.numel()
        if M < 2:
            continue
        K = min(num_negatives, M - 1)
        c = out.contexts[b, idx].float()  # [M, P]
        q = out.targets[b, idx].float()  # [M, P]
        r = torch.randint(M - 1, (M, K), generator=generator).to(idx.device)  # [M, K] in [0, M - 1)
        r = r + (r >= torch.arange(M, device=idx.device)[:, None]).long()  # skip the frame itself
        candidates = torch.cat([q.unsqueeze(1), q[r]], dim=1)  # [M, 1 + K, P]
        sim = F.cosine_similarity(c.unsqueeze(1), candidates, dim=-1) / temperature  # [M, 1 + K]
        if exclude_same_code:
            codes = out.codes[b, idx]  # [M]
            same = torch.cat([torch.zeros_like(codes[:, None], dtype=torch.bool), codes[r] == codes[:, None]], 1)
            sim = sim.masked_fill(same, float("-inf"))  # [M, 1 + K]
        logits.append(sim)
    if not logits:
        return out.contexts.sum() * 0.0
    # rows have different K only if crops have different mask counts: pad with -inf
    width = max(x.shape[1] for x in logits)
    logits = torch.cat([F.pad(x, (0, width - x.shape[1]), value=float("-inf")) for x in logits])  # [sum M, 1 + K]
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def diversity_loss(avg_probs: torch.Tensor) -> torch.Tensor:
    """(V - perplexity) / V of the batch-average code distribution: 0 when every code is equally used."""
    V = avg_probs.numel()
    entropy = -(avg_probs * torch.log(avg_probs + 1e-7)).sum()
    return (V - entropy.exp()) / V


def mlm_loss(out: W2VBertOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the MLM head against the quantizer's code ids at masked frames, and accuracy."""
    logits = out.mlm_logits[out.mask].float()  # [M, V]
    targets = out.codes[out.mask].detach()  # [M]
    return F.cross_entropy(logits, targets), (logits.argmax(-1) == targets).float().mean()


def w2vbert_losses(out: W2VBertOutput, config: W2VBertConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    contrastive = contrastive_loss(
        out, config.num_negatives, config.contrastive_temperature, generator, exclude_same_code=config.quantizer == "vq"
    )
    # the diversity loss only has a gradient for the Gumbel quantizer (an EMA codebook restarts dead codes)
    diversity = diversity_loss(out.avg_probs) if config.quantizer == "gumbel" else out.avg_probs.new_zeros(())
    mlm, accuracy = mlm_loss(out)
    total = contrastive + config.diversity_weight * diversity + mlm
    perplexity = torch.exp(-(out.avg_probs * torch.log(out.avg_probs + 1e-7)).sum())
    return {
        "loss": total,
        "contrastive_loss": contrastive,
        "diversity_loss": diversity,
        "mlm_loss": mlm,
        "mlm_accuracy": accuracy,
        "code_perplexity": perplexity,
    }


# --------------------------------------------------------------------------- learner


def random_crops(wavs: list[np.ndarray], length: int, rng: np.random.Generator) -> torch.Tensor:
    """One random ``length``-sample crop per clip (zero-padded at the end when the clip is shorter)."""
    out = np.zeros((len(wavs), length), dtype=np.float32)
    for i, wav in enumerate(wavs):
        if len(wav) > length:
            start = int(rng.integers(0, len(wav) - length + 1))
            wav = wav[start : start + length]
        out[i, : len(wav)] = wav
    return torch.from_numpy(out)  # [B, length]


def worker_rank() -> int:
    """This process's rank among the training workers (0 outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class W2VBertLearner:
    """Learner (docs/interfaces.md) of the w2v-BERT feature model; exports kind ``w2vbert``."""

    kind = "w2vbert"
    shard_kind = "audio"
    default_max_steps = {"tiny": 300, "paper": 400_000}

    def __init__(
        self,
        preset: str,
        device: torch.device,
        wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
        *,
        lr: float | None = None,
        batch_size: int | None = None,
        crop_seconds: float | None = None,
        warmup_steps: int | None = None,
        weight_decay: float | None = None,
        seed: int = 0,
        config: W2VBertConfig | None = None,
    ):
        self.preset = preset
        self.config = config or W2VBertConfig.preset(preset)
        defaults = DEFAULTS[preset]
        self.lr = lr if lr is not None else defaults["lr"]
        self.batch_size = batch_size if batch_size is not None else defaults["batch_size"]
        crop_seconds = crop_seconds if crop_seconds is not None else defaults["crop_seconds"]
        # crops are whole semantic frames so that the mask matches the features exactly
        self.crop_samples = max(1, int(crop_seconds * SAMPLE_RATE) // SEMANTIC_HOP) * SEMANTIC_HOP
        self.warmup_steps = warmup_steps if warmup_steps is not None else defaults["warmup_steps"]
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.module = W2VBert(self.config).to(self.device)
        self.module.preset = preset
        self.model = wrap_model(self.module)
        wd = weight_decay if weight_decay is not None else defaults["weight_decay"]
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=self.lr, betas=(0.9, 0.98), weight_decay=wd, fused=True)
        self.step = 0
        self.rng = np.random.default_rng([seed, worker_rank()])
        self.generator = torch.Generator().manual_seed(seed * 1000 + worker_rank())
        self.skipped = 0

    # ------------------------------------------------------------------ data
    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor] | None:
        wavs = []
        for s in samples:
            wav = s.get("wav")
            if wav is None or len(wav) < SEMANTIC_HOP:
                self.skipped += 1
                log.warning("skipping sample %s without usable audio (%d skipped so far)", s.get("__key__"), self.skipped)
                continue
            wavs.append(np.asarray(wav, dtype=np.float32))
        if not wavs:
            return None
        wav = random_crops(wavs, self.crop_samples, self.rng)  # [B, T]
        frames = self.crop_samples // SEMANTIC_HOP
        mask = compute_span_mask(len(wavs), frames, self.config.mask_prob, self.config.mask_span, self.rng, min_spans=2)
        return {"wav": wav, "mask": mask}

    # ------------------------------------------------------------------ steps
    def gumbel_temperature(self) -> float:
        start, floor, decay = self.config.gumbel_temperature
        return max(floor, start * decay**self.step)

    def _lr(self) -> float:
        return self.lr * min(1.0, (self.step + 1) / max(1, self.warmup_steps))

    def train_step(self, batch: dict[str, torch.Tensor] | None) -> dict[str, float]:
        if batch is None:
            return {}
        self.model.train()
        if self.config.quantizer == "gumbel":
            self.module.quantizer.temperature = self.gumbel_temperature()
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        out = self.model(batch["wav"].to(self.device), batch["mask"].to(self.device))
        losses = w2vbert_losses(out, self.config, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        metrics = {k: float(v.detach()) for k, v in losses.items()}
        metrics.update(grad_norm=float(grad_norm), gumbel_temperature=self.module.quantizer.temperature, lr=self._lr())
        return metrics

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor] | None) -> dict[str, float]:
        if batch is None:
            return {}
        self.model.eval()
        out = self.model(batch["wav"].to(self.device), batch["mask"].to(self.device))
        losses = w2vbert_losses(out, self.config, torch.Generator().manual_seed(0))
        self.model.train()
        return {k: float(v) for k, v in losses.items()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng": self.rng.bit_generator.state,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def export(self, out_dir: str) -> None:
        save_w2vbert(self.module, out_dir, self.preset, meta={"step": self.step, "crop_samples": self.crop_samples})

