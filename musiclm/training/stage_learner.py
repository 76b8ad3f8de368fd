"""Learner (docs/interfaces.md) of one MusicLM stage: semantic, coarse or fine.

Next-token cross-entropy on the generated part of each layout only (the conditioning prefix is
given, not modelled). AdamW, linear warmup then constant or cosine, gradient clipping at 1.0.

To tell learning from memorising the token histogram, the learner keeps running counts of the
target tokens it has trained on and reports, on held-out batches, the cross-entropy of the same
targets under that unigram model next to the model's. The unigram model is conditioned on the
target's codebook (a fine-stage target at level 7 is scored among level-7 codes only), because
the model knows the level from the position for free; beating it means the model uses context.

Classifier-free guidance (issue 4): ``conditioning_dropout`` (default 0.1) replaces M, and independently
the melody, by NULL in training examples, so the stage also learns the unconditional distribution.
Held-out batches are scored with their conditioning as given (``ce``) and nulled (``ce_unconditioned``;
with melody also ``ce_without_melody``): the gap is what the condition tells the model, i.e. what
guidance can amplify.

Mixed precision: ``precision="bf16"`` runs the forward passes under ``torch.autocast`` (bfloat16) on the
learner's device; the loss is computed in float32, weights and AdamW states stay float32.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
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
from musiclm.constants import MELODY_CODEBOOK_SIZE
from musiclm.models.stages import (
    STAGES,
    StageConfig,
    VocabLayout,
    as_rates,
    build_training_crop,
    describe_rates,
    drop_conditioning,
)
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
PRECISIONS = ("fp32", "bf16")  # bf16: forward under torch.autocast(bfloat16); weights and optimizer stay fp32


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


def block_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, block: int, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the target's own codebook block only: sampling draws each position from its
    block (``VocabLayout.allowed_ranges``), so training on the same softmax spends no capacity on
    learning which block comes next. ``logits`` [N, V_out], ``targets`` [N] output ids."""
    rows = torch.arange(targets.numel(), device=targets.device)
    own = logits.view(targets.numel(), -1, block)[rows, targets // block]  # [N, blocks, block] -> [N, block]
    return F.cross_entropy(own.float(), targets % block, reduction=reduction)


def _start_from_codec(model: StageTransformer, config: StageConfig, folder: str, token_info: dict[str, Any] | None,
                      seed: int) -> None:
    """``add_code_vectors`` from the SoundStream in ``folder``, after checking it is the shards' codec."""
    from musiclm.training.code_embeddings import add_code_vectors, codec_code_vectors

    add_code_vectors(model, config, codec_code_vectors(folder, token_info), seed=seed)


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
        conditioning_dropout: float = 0.1,
        melody: bool = False,
        melody_codebooks: int | None = None,
        melody_codebook_size: int | None = None,
        precision: str = "fp32",
        contour: bool = False,
        codec_init: str | None = None,
    ) -> None:
        """``rates``: the token rates of the shards (``TokenRates`` or its dict; default the paper's), which
        size the vocabulary and sequences; ``token_info``: the shards' tokenizer record, kept in the export.
        ``conditioning_dropout``: probability of nulling M (and, independently, the melody) per example.
        Melody conditioning: ``melody_codebooks`` / ``melody_codebook_size`` (the melody RVQ's), or
        ``melody=True`` to read them from ``token_info["melody"]`` (``num_codebooks``, ``codebook_size``).
        ``contour``: also condition on the melody contour (``sample["contour"]``, :mod:`musiclm.tokenizers.contour`).
        ``precision``: ``"fp32"``, or ``"bf16"`` to run the forward under ``torch.autocast`` with bfloat16.
        ``codec_init``: a folder holding the codec the shards were tokenized with (``soundstream/``, e.g. the
        checkpoints folder): the acoustic embeddings and output rows start from its code vectors
        (:mod:`musiclm.training.code_embeddings`)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}': valid stages are {', '.join(STAGES)}")
        if not 0.0 <= conditioning_dropout <= 1.0:
            raise ValueError(f"conditioning_dropout must be in [0, 1], got {conditioning_dropout}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: valid precisions are {', '.join(PRECISIONS)}")
        self.precision = precision
        codebooks, size = melody_options(melody, melody_codebooks, melody_codebook_size, token_info)
        # raises for an unknown preset
        self.config = StageConfig.preset(stage, preset, as_rates(rates), melody_codebooks=codebooks,
                                         melody_codebook_size=size, contour=bool(contour))
        self.conditioning_dropout = float(conditioning_dropout)
        self.token_info = token_info
        defaults = DEFAULTS[preset]
        self.stage, self.preset, self.kind = stage, preset, stage
        self.device = torch.device(device)
        self.batch_size = batch_size or defaults["batch_size"][stage]
        self.lr = lr if lr is not None else defaults["lr"]
        self.warmup_steps = defaults["warmup_steps"] if warmup_steps is None else warmup_steps
        self.max_steps = max_steps  # None: constant learning rate after warmup; else cosine to 10% at max_steps
        self.rng = np.random.default_rng(seed)
        model = StageTransformer(self.config.transformer)
        if codec_init is not None:
            _start_from_codec(model, self.config, codec_init, token_info, seed)
        self.model = wrap_model(model.to(self.device))
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
        """Decoded token-shard samples -> {"tokens": long [B, L], "loss_mask": bool [B, L], "condition": long
        [B, cond_len]}, right-padded with PAD; ``tokens`` has the conditioning dropout applied, ``condition``
        is the condition as given (held-out batches are scored with it)."""
        if not samples:
            raise ValueError("collate needs at least one sample")
        layout = self.config.layout
        null = self.config.transformer.frame_null
        examples, conditions, given = [], [], []
        for s in samples:
            t, m, f = build_training_crop(s, self.stage, self.config, self.rng)
            conditions.append(t[: layout.cond_len].copy())
            given.append(None if f is None else f.copy())
            examples.append((drop_conditioning(t, layout, self.rng, self.conditioning_dropout, f, null), m, f))
        length = max(len(t) for t, _, _ in examples)
        tokens = np.full((len(examples), length), layout.pad, dtype=np.int64)
        mask = np.zeros((len(examples), length), dtype=bool)
        frames = np.full((2, len(examples), length), null, dtype=np.int64)  # as dropped, as given
        for i, (t, m, f) in enumerate(examples):
            tokens[i, : len(t)] = t
            mask[i, : len(m)] = m
            if f is not None:
                frames[0, i, : len(f)], frames[1, i, : len(f)] = f, given[i]
        batch = {"tokens": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(mask),
                 "condition": torch.from_numpy(np.stack(conditions))}
        if self.config.contour:  # the melody contour's class of every position (``contour_positions``)
            batch["frames"], batch["frames_given"] = torch.from_numpy(frames[0]), torch.from_numpy(frames[1])
        return batch

    def _forward(self, inputs: torch.Tensor, select: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits [N, V_out] of the selected positions, under autocast with ``precision="bf16"``
        (bfloat16 logits then; ``block_cross_entropy`` takes the loss in float32)."""
        if self.precision == "bf16":
            autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        else:
            autocast = contextlib.nullcontext()
        with autocast:
            return self.model(inputs, select, frames)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        batch = {k: v.to(self.device) for k, v in batch.items()}
        inputs, select, targets = next_token_batch(batch)
        frames = batch["frames"][:, :-1] if "frames" in batch else None  # the classes of the input positions
        logits = self._forward(inputs, select, frames)  # [N, V_out]
        loss = block_cross_entropy(logits, targets, self.config.layout.output_block_size)
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
        """Masked cross-entropy (nats/token) with the condition as given, the unigram baseline's on the same
        targets, and the cross-entropy with the condition nulled (``ce_unconditioned``, and with only the
        melody nulled, ``ce_without_melody``, for a stage with melody)."""
        self.model.eval()
        batch = {k: v.to(self.device) for k, v in batch.items()}
        layout = self.config.layout
        tokens = batch["tokens"].clone()
        if "condition" in batch:  # undo the conditioning dropout of collate
            tokens[:, : layout.cond_len] = batch["condition"]
        inputs, select, targets = next_token_batch({"tokens": tokens, "loss_mask": batch["loss_mask"]})
        block = layout.output_block_size
        frames = batch.get("frames_given", batch.get("frames"))  # the contour as given (undo its dropout too)
        frames = None if frames is None else frames[:, :-1]
        ce = block_cross_entropy(self._forward(inputs, select, frames), targets, block)  # logits [N, V_out]
        unigram = -self.unigram_log_probs()[targets.cpu()].mean()
        metrics = {"ce": float(ce), "unigram_ce": float(unigram), "ce_gain": float(unigram - ce)}
        nulled = {"ce_unconditioned": layout.unconditional(inputs)}
        if layout.melody_codebooks or frames is not None:
            nulled["ce_without_melody"] = layout.unconditional(inputs, mulan=False)
        for name, x in nulled.items():  # no contour (NULL frames) in either: it is part of the melody
            metrics[name] = float(block_cross_entropy(self._forward(x, select), targets, block))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "counts": self.counts.clone(),
            "rng": self.rng.bit_generator.state,
            "rates": self.config.rates.to_dict(),
            "melody": [self.config.melody_codebooks, self.config.melody_codebook_size],
            "contour": self.config.contour,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = as_rates(state.get("rates"))  # states saved before rates were recorded are the paper's
        if saved != self.config.rates:
            raise ValueError(
                f"the saved {self.stage} state models tokens at {describe_rates(saved)}, this run's shards are at "
                f"{describe_rates(self.config.rates)}: train into another output folder"
            )
        melody = [self.config.melody_codebooks, self.config.melody_codebook_size]
        saved_melody = list(state.get("melody", [0, MELODY_CODEBOOK_SIZE]))
        if saved_melody[0] != melody[0] or (melody[0] and saved_melody != melody):
            raise ValueError(
                f"the saved {self.stage} state has melody conditioning {_describe_melody(*saved_melody)}, this run "
                f"{_describe_melody(*melody)}: train into another output folder"
            )
        saved_contour = bool(state.get("contour", "frame_embed.weight" in state["model"]))
        if saved_contour != self.config.contour:
            raise ValueError(
                f"the saved {self.stage} state was trained {'with' if saved_contour else 'without'} the melody "
                f"contour (frame_classes), this run {'with' if self.config.contour else 'without'}: train into another "
                "output folder"
            )
        embed = state["model"].get("embed.weight")
        if embed is not None and embed.shape[0] == self.config.layout.vocab_size - 1:
            raise ValueError(
                f"the saved {self.stage} state predates the null id of classifier-free guidance (its vocabulary "
                "is one id short): train into another output folder (its export still loads with load_stage)"
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
            meta={"step": self.step, "train_target_tokens": int(self.counts.sum()), "precision": self.precision,
                  **({"token_info": self.token_info} if self.token_info else {})},
        )


def _describe_melody(codebooks: int, size: int) -> str:
    return f"{codebooks} x {size}" if codebooks else "none"


def melody_options(
    melody: bool, codebooks: int | None, size: int | None, token_info: dict[str, Any] | None
) -> tuple[int, int]:
    """(melody codebooks, codebook size) of the learner options: explicit numbers win; ``melody=True``
    reads them from the shards' ``token_info["melody"]``; otherwise no melody (0)."""
    if codebooks is None and melody:
        record = (token_info or {}).get("melody") or {}
        codebooks = record.get("num_codebooks", record.get("codebooks"))
        size = size if size is not None else record.get("codebook_size")
        if codebooks is None or size is None:
            raise ValueError(
                "melody=True needs shards with melody tokens (token_info['melody'] with num_codebooks and "
                "codebook_size; tokenize with a checkpoint folder that has melody/ and melody_rvq/), or give "
                "melody_codebooks and melody_codebook_size"
            )
    codebooks = int(codebooks or 0)
    size = int(size if size is not None else MELODY_CODEBOOK_SIZE)
    if codebooks < 0 or size < 1:
        raise ValueError(f"melody_codebooks must be >= 0 and melody_codebook_size >= 1, got {codebooks}, {size}")
    return codebooks, size


def _add_null_row(weights: dict[str, torch.Tensor], layout: VocabLayout) -> dict[str, torch.Tensor]:
    """Weights of a stage saved before the null id: the embedding gains the NULL row, set to the mean of
    the conditioning (M) rows, an untrained stand-in (guidance with such a stage is not meaningful)."""
    embed = weights.get("embed.weight")
    if embed is None:  # not a stage's weights: load_weights says so
        return weights
    qm = layout.rates.conditioning_codebooks * layout.rates.conditioning_codebook_size
    null = embed[layout.mulan_offset : layout.mulan_offset + qm].mean(dim=0, keepdim=True)  # [1, D]
    return {**weights, "embed.weight": torch.cat([embed, null.to(embed.dtype)])}  # [V + 1, D]


def load_stage(
    path: str | os.PathLike, stage: str | None = None, preset: str | None = None
) -> tuple[StageTransformer, StageConfig]:
    """A saved stage, ``eval()``ed, and its config; ``stage=None`` takes the kind recorded in the folder.

    A stage saved before issue 4 (no melody fields, no null id) still loads: its embedding gains the
    null row (see ``_add_null_row``) with a warning, since its unconditional branch was never trained.
    """
    if stage is None:
        stage = read_artifact_config(path)["kind"]
        if stage not in STAGES:
            raise CheckpointError(f"{path} holds a '{stage}' checkpoint, not a stage ({', '.join(STAGES)})")
    document, weights = load_artifact(path, kind=stage, preset=preset)
    data = dict(document["config"])
    try:
        transformer = config_from_dict(TransformerConfig, data.pop("transformer"))
        rates = as_rates(data.pop("rates", None))  # stages saved before rates were recorded are the paper's
        before_null = "melody_codebooks" not in data  # saved before issue 4: a vocabulary without NULL
        if before_null:
            stage_name = data.get("stage", stage)
            if transformer.vocab_size + 1 != VocabLayout.for_stage(stage_name, rates).vocab_size:
                raise ValueError(f"vocab_size {transformer.vocab_size} fits no layout of the {stage_name} stage")
            transformer.vocab_size += 1
        config = StageConfig(transformer=transformer, rates=rates, **data)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: the stage config does not match this version ({exc}): retrain the stage"
        ) from exc
    if before_null:
        warnings.warn(
            f"{path} was saved before classifier-free guidance (no null id, no conditioning dropout): it loads, "
            "but guidance_scale != 1 with it is untrained; retrain to use guidance",
            stacklevel=2,
        )
        weights = _add_null_row(weights, config.layout)
    model = StageTransformer(config.transformer)
    load_weights(model, weights, path)
    return model.eval(), config
