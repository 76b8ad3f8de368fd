"""Learner (docs/interfaces.md) of one MusicLM stage: semantic, coarse or fine.

Next-token cross-entropy on the generated part of each layout only (the conditioning prefix is
given, not modelled). AdamW, linear warmup then constant or cosine, gradient clipping at 1.0.

To tell learning from memorising the token histogram, the learner keeps running counts of the
target tokens it has trained on and reports, on held-out batches, the cross-entropy of the same
targets under that unigram model next to the model's. The unigram model is conditioned on the
target's codebook (a fine-stage target at level 7 is scored among level-7 codes only), because
the model knows the level from the position for free; beating it means the model uses context.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musiclm.checkpoint import (
    CheckpointError,
    config_from_dict,
    load_artifact,
    load_weights,
    read_artifact_config,
    save_artifact,
)
from musiclm.models.stages import STAGES, StageConfig, as_rates, build_training_example, describe_rates
from musiclm.models.transformer import StageTransformer, TransformerConfig
from musiclm.tokenizers.backends import TokenRates

# per preset: learning rate, batch size (sequences per worker per step), warmup steps, weight decay
DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"lr": 1e-3, "warmup_steps": 20, "weight_decay": 0.1,
             "batch_size": {"semantic": 4, "coarse": 2, "fine": 2}},
    "paper": {"lr": 3e-4, "warmup_steps": 5_000, "weight_decay": 0.1,
              "batch_size": {"semantic": 32, "coarse": 32, "fine": 32}},
}
UNIGRAM_PSEUDO_COUNT = 1e-2  # keeps held-out tokens unseen in training possible


def _identity(model: nn.Module) -> nn.Module:
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    """The StageTransformer inside a DDP (``.module``) wrapper, or the model itself."""
    return getattr(model, "module", model)


def next_token_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [B, L-1], target mask [B, L-1], targets [N]) for next-token prediction."""
    tokens, loss_mask = batch["tokens"], batch["loss_mask"]
    inputs, select = tokens[:, :-1], loss_mask[:, 1:]  # position i predicts token i + 1
    return inputs, select, tokens[:, 1:][select]


class StageLearner:
    """Trains the Transformer of one stage; exports an artifact of kind ``stage``."""

    shard_kind = "tokens"
    default_max_steps = {"tiny": 150, "paper": 1_000_000}  # tiny: sized for the CPU demo

    def __init__(
        self,
        preset: str,
        device: torch.device | str = "cpu",
        wrap_model: Callable[[nn.Module], nn.Module] = _identity,
        *,
        stage: str,
        lr: float | None = None,
        batch_size: int | None = None,
        warmup_steps: int | None = None,
        max_steps: int | None = None,
        weight_decay: float | None = None,
        seed: int = 0,
        rates: TokenRates | dict[str, Any] | None = None,
        token_info: dict[str, Any] | None = None,
    ) -> None:
        """``rates``: the token rates of the shards (``TokenRates`` or its dict; default the paper's), which
        size the vocabulary and sequences; ``token_info``: the shards' tokenizer record, kept in the export."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}': valid stages are {', '.join(STAGES)}")
        self.config = StageConfig.preset(stage, preset, as_rates(rates))  # raises for an unknown preset
        self.token_info = token_info
        defaults = DEFAULTS[preset]
        self.stage, self.preset, self.kind = stage, preset, stage
        self.device = torch.device(device)
        self.batch_size = batch_size or defaults["batch_size"][stage]
        self.lr = lr if lr is not None else defaults["lr"]
        self.warmup_steps = defaults["warmup_steps"] if warmup_steps is None else warmup_steps
        self.max_steps = max_steps  # None: constant learning rate after warmup; else cosine to 10% at max_steps
        self.rng = np.random.default_rng(seed)
        self.model = wrap_model(StageTransformer(self.config.transformer).to(self.device))
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        wd = defaults["weight_decay"] if weight_decay is None else weight_decay
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=(0.9, 0.95),
            fused=True,  # one fused kernel: the default per-tensor loop costs ~0.8 s/step on 2 CPU cores, fused 0.01 s
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.counts = torch.zeros(self.config.transformer.num_outputs, dtype=torch.float64)  # target histogram

    def _lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.max_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """Decoded token-shard samples -> {"tokens": long [B, L], "loss_mask": bool [B, L]}, right-padded with PAD."""
        if not samples:
            raise ValueError("collate needs at least one sample")
        examples = [build_training_example(s, self.stage, self.config, self.rng) for s in samples]
        length = max(len(t) for t, _ in examples)
        tokens = np.full((len(examples), length), self.config.layout.pad, dtype=np.int64)
        mask = np.zeros((len(examples), length), dtype=bool)
        for i, (t, m) in enumerate(examples):
            tokens[i, : len(t)] = t
            mask[i, : len(m)] = m
        return {"tokens": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(mask)}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        inputs, select, targets = next_token_batch({k: v.to(self.device) for k, v in batch.items()})
        logits = self.model(inputs, select)  # [N, V_out]
        loss = F.cross_entropy(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.counts += torch.bincount(targets.cpu(), minlength=self.counts.numel()).double()
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "tokens": float(targets.numel())}

    def unigram_log_probs(self) -> torch.Tensor:
        """log p(token | its codebook) from the training targets seen so far: [V_out] (float64)."""
        block = self.config.layout.output_block_size
        counts = (self.counts + UNIGRAM_PSEUDO_COUNT).view(-1, block)  # [blocks, codebook size]
        return (counts / counts.sum(dim=1, keepdim=True)).log().view(-1)

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Masked cross-entropy (nats/token) and the unigram baseline's on the same targets."""
        self.model.eval()
        inputs, select, targets = next_token_batch({k: v.to(self.device) for k, v in batch.items()})
        logits = self.model(inputs, select)  # [N, V_out]
        ce = F.cross_entropy(logits.float(), targets)
        unigram = -self.unigram_log_probs()[targets.cpu()].mean()
        return {"ce": float(ce), "unigram_ce": float(unigram), "ce_gain": float(unigram - ce)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "counts": self.counts.clone(),
            "rng": self.rng.bit_generator.state,
            "rates": self.config.rates.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = as_rates(state.get("rates"))  # states saved before rates were recorded are the paper's
        if saved != self.config.rates:
            raise ValueError(
                f"the saved {self.stage} state models tokens at {describe_rates(saved)}, this run's shards are at "
                f"{describe_rates(self.config.rates)}: train into another output folder"
            )
        _unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.counts = state["counts"].clone().double()
        self.rng.bit_generator.state = state["rng"]

    def export(self, out_dir: str) -> None:
        """Save the stage as an artifact of kind ``stage`` (load it with ``load_stage``)."""
        save_artifact(
            out_dir, kind=self.stage, preset=self.preset, config=self.config,
            state_dict=_unwrap(self.model).state_dict(),
            meta={"step": self.step, "train_target_tokens": int(self.counts.sum()),
                  **({"token_info": self.token_info} if self.token_info else {})},
        )


def load_stage(
    path: str | os.PathLike, stage: str | None = None, preset: str | None = None
) -> tuple[StageTransformer, StageConfig]:
    """A saved stage, ``eval()``ed, and its config; ``stage=None`` takes the kind recorded in the folder."""
    if stage is None:
        stage = read_artifact_config(path)["kind"]
        if stage not in STAGES:
            raise CheckpointError(f"{path} holds a '{stage}' checkpoint, not a stage ({', '.join(STAGES)})")
    document, weights = load_artifact(path, kind=stage, preset=preset)
    data = dict(document["config"])
    try:
        transformer = config_from_dict(TransformerConfig, data.pop("transformer"))
        rates = as_rates(data.pop("rates", None))  # stages saved before rates were recorded are the paper's
        config = StageConfig(transformer=transformer, rates=rates, **data)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the stage config does not match this version: {exc}") from exc
    model = StageTransformer(config.transformer)
    load_weights(model, weights, path)
    return model.eval(), config
