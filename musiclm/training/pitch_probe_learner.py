"""Learner (docs/interfaces.md) of the pitch probe (:mod:`musiclm.models.pitch_probe`); exports kind ``pitch_probe``.

It reads token shards: each sample's coarse acoustic codes and its melody contour (one pitch class per
40-ms frame, ``contour.npy``). Every acoustic frame is an example: its partial latents (levels ``0..q``,
summed from the codec's code vectors) labelled with its frame's pitch class. Unpitched frames (rests)
are skipped. Held-out batches report each probe's cross-entropy next to the pitch-class prior's (the
label histogram of the training frames), so a probe that learned nothing shows it.

``codec_init`` (required) is the folder holding the codec the shards were tokenized with
(``soundstream/``); its code vectors are kept in the probe, so sampling needs no codec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from musiclm.checkpoint import config_from_dict, load_artifact, load_weights, save_artifact
from musiclm.models.pitch_probe import PitchProbe, PitchProbeConfig
from musiclm.tokenizers.contour import PITCH_CLASSES

KIND = "pitch_probe"


class PitchProbeLearner:
    kind = KIND
    shard_kind = "tokens"
    default_max_steps = {"tiny": 1000, "paper": 20_000}

    def __init__(
        self,
        preset: str,
        device: torch.device | str = "cpu",
        wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
        *,
        codec_init: str | None = None,
        token_info: dict[str, Any] | None = None,
        coarse_levels: int = 4,
        lr: float = 2e-3,
        batch_size: int = 8,
        frames_per_step: int = 2048,
        weight_decay: float = 0.05,
        max_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        """``codec_init``: the folder holding ``soundstream/`` (the shards' codec); ``batch_size``: samples
        per step, of which ``frames_per_step`` random pitched frames are trained on."""
        from musiclm.training.code_embeddings import codec_code_vectors

        if codec_init is None:
            raise ValueError("the pitch probe needs codec_init=<folder holding soundstream/> (the shards' codec)")
        vectors = codec_code_vectors(codec_init, token_info)  # [K, V, D]
        if vectors.shape[0] < coarse_levels:
            raise ValueError(f"the codec has {vectors.shape[0]} levels, fewer than coarse_levels={coarse_levels}")
        self.config = PitchProbeConfig.preset(preset, coarse_levels, vectors.shape[1], vectors.shape[2])
        module = PitchProbe(self.config)
        module.code_vectors.copy_(vectors[:coarse_levels])
        self.preset, self.device = preset, torch.device(device)
        self.module = module.to(self.device)
        self.model = wrap_model(self.module)
        self.batch_size, self.frames_per_step = batch_size, frames_per_step
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.rng = np.random.default_rng(seed)
        self.step = 0
        self.normalised = False  # the partial latents' mean / std come from the first batch
        self.counts = torch.zeros(PITCH_CLASSES, dtype=torch.float64)  # training labels seen (the prior)

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """Token samples -> {"codes": long [N, levels], "pitch": long [N]}: every pitched acoustic frame."""
        K = self.config.levels
        codes, pitch = [], []
        for s in samples:
            contour = s.get("contour")
            if contour is None or not np.asarray(contour).size:
                raise ValueError(f"sample {s.get('__key__', '?')} has no contour.npy: tokenize with a melody tokenizer")
            contour = np.asarray(contour, dtype=np.int64).reshape(-1)
            acoustic = np.asarray(s["acoustic"], dtype=np.int64)  # [Fa, K_all]
            per = max(1, acoustic.shape[0] // max(1, len(np.asarray(s["semantic"]).reshape(-1))))
            n = min(len(contour), acoustic.shape[0] // per)
            labels = np.repeat(contour[:n], per)  # [per n]: each acoustic frame gets its 40-ms frame's class
            keep = labels < PITCH_CLASSES
            codes.append(acoustic[: n * per, :K][keep])
            pitch.append(labels[keep])
        codes_np, pitch_np = np.concatenate(codes), np.concatenate(pitch)
        if len(pitch_np) > self.frames_per_step:
            pick = self.rng.choice(len(pitch_np), self.frames_per_step, replace=False)
            codes_np, pitch_np = codes_np[pick], pitch_np[pick]
        return {"codes": torch.from_numpy(codes_np), "pitch": torch.from_numpy(pitch_np)}

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        codes, pitch = batch["codes"].to(self.device), batch["pitch"].to(self.device)
        latents = self.module.partial_latents(codes)  # [K, N, D]
        logits = [self.model(latents[q], q) for q in range(self.config.levels)]  # K x [N, 12]
        return [F.cross_entropy(x, pitch) for x in logits], [(x.argmax(1) == pitch).float().mean() for x in logits]

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if not len(batch["pitch"]):
            return {"loss": float("nan"), "frames": 0.0}
        if not self.normalised:
            with torch.no_grad():
                latents = self.module.partial_latents(batch["codes"].to(self.device))  # [K, N, D]
                self.module.mean.copy_(latents.mean(1))
                self.module.std.copy_(latents.std(1).clamp_min(1e-4))
            self.normalised = True
        self.model.train()
        losses, _ = self._losses(batch)
        loss = torch.stack(losses).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.counts += torch.bincount(batch["pitch"], minlength=PITCH_CLASSES).double()
        return {"loss": float(loss.detach()), "frames": float(len(batch["pitch"]))}

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Cross-entropy (nats) of the probe on all coarse levels (``ce``) and on level 0 alone, the prior's
        on the same frames, and the accuracy."""
        self.model.eval()
        losses, accuracy = self._losses(batch)
        prior = (self.counts + 1.0) / (self.counts.sum() + PITCH_CLASSES)
        prior_ce = -prior.log()[batch["pitch"]].mean()
        return {"ce": float(losses[-1]), "ce_level0": float(losses[0]), "prior_ce": float(prior_ce),
                "ce_gain": float(prior_ce - losses[-1]), "accuracy": float(accuracy[-1])}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "normalised": self.normalised, "counts": self.counts, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.normalised = int(state["step"]), bool(state["normalised"])
        self.counts = state["counts"].double()
        self.rng.bit_generator.state = state["rng"]

    def export(self, out_dir: str) -> None:
        save_artifact(out_dir, kind=KIND, preset=self.preset, config=self.config,
                      state_dict=self.module.state_dict(), meta={"step": self.step})


def load_pitch_probe(path: str, device: str | torch.device = "cpu") -> PitchProbe:
    """The probe exported to ``path`` (a ``pitch_probe`` artifact folder), in eval mode."""
    document, weights = load_artifact(path, kind=KIND)
    module = PitchProbe(config_from_dict(PitchProbeConfig, document["config"]))
    load_weights(module, weights, path)
    return module.to(device).eval()


def load_pitch_probe_in(ckpt_dir: Any, device: str | torch.device = "cpu") -> PitchProbe | None:
    """``ckpt_dir/pitch_probe`` loaded (``load_pitch_probe``), or None when the folder has none (it is optional)."""
    from pathlib import Path

    folder = Path(ckpt_dir) / "pitch_probe"
    return load_pitch_probe(str(folder), device) if folder.is_dir() else None
