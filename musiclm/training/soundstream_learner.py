"""Training SoundStream: reconstruction + adversarial + feature-matching losses, RVQ commitment.

The generator (encoder, RVQ, decoder) minimises, as in the SoundStream paper (§3.4),
  lambda_rec  * multi-scale spectral reconstruction (``musiclm.audio.mel.MultiScaleMel.loss``: L1 on mel +
                sqrt(s/2)-weighted L2 on log-mel, windows s = 2^6 .. 2^11)
  + lambda_adv  * hinge adversarial loss, averaged over the discriminators
  + lambda_feat * feature-matching loss (mean L1 between the discriminators' feature maps of real and
                  decoded audio, averaged over layers and discriminators)
  + the RVQ commitment loss (and an optional L1 waveform term, 0 in the paper),
with the paper's weights lambda_rec = 1, lambda_adv = 1, lambda_feat = 100; the discriminators
(multi-scale waveform + multi-resolution STFT) minimise the hinge loss. The adversarial terms switch
on after ``adversarial_start`` steps, so that a small model first learns to reconstruct and the
discriminators then sharpen it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm.audio.mel import MultiScaleMel
from musiclm.checkpoint import save_artifact
from musiclm.constants import ACOUSTIC_HOP, SAMPLE_RATE
from musiclm.evaluation.learning import si_snr
from musiclm.tokenizers.soundstream import SoundStream, SoundStreamConfig, SoundStreamDiscriminator

__all__ = ["MultiScaleMel", "SoundStreamLearner", "SoundStreamTrainingConfig", "code_perplexity", "si_snr"]


@dataclass
class SoundStreamTrainingConfig:
    """Optimisation settings; ``paper`` uses SoundStream's Adam settings and loss weights, ``tiny`` a fast
    CPU schedule."""

    lr: float = 1e-4
    disc_lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    batch_size: int = 16
    crop_seconds: float = 1.0
    adversarial_start: int = 1000  # generator steps of pure reconstruction before the GAN terms
    mel_scales: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    n_mels: int = 64
    mel_weight: float = 1.0  # lambda_rec
    wave_weight: float = 0.0  # L1 on the waveform (not in the paper)
    adversarial_weight: float = 1.0  # lambda_adv
    feature_weight: float = 100.0  # lambda_feat
    grad_clip: float = 1000.0
    # steps as a plain autoencoder before the RVQ is switched on and fitted by k-means (residual by
    # residual) on the latents of the last ``init_batches`` batches: the codebooks then start where
    # the trained encoder puts its latents instead of chasing them (0: SoundStream's k-means init
    # from the first batch)
    quantizer_warmup: int = 0
    init_batches: int = 16
    seed: int = 0

    @classmethod
    def preset(cls, name: str) -> SoundStreamTrainingConfig:
        if name == "paper":
            return cls()
        if name == "tiny":
            # tuned for the demo's 400 steps (benchmarks/bench_codec.py, held-out SI-SNR / mel distance at
            # 12 levels): the GAN terms start only past that budget (for the last 150 steps they cost 2x
            # per step and gave -42 dB / 1.21 against -43 dB / 1.15 without), and the time saved buys
            # batch 8. A waveform L1 is what makes the output follow the input's phase (mel losses
            # ignore it): the mel loss sums magnitudes (~1e3) while the L1 is ~0.1, so it needs a weight
            # ~1e4 to pull as hard (40000: -43 -> +1.8 dB, with lr 1e-3; 2e-3 and 4e-3 were worse)
            return cls(
                lr=1e-3,
                disc_lr=5e-4,
                betas=(0.8, 0.99),
                batch_size=8,
                crop_seconds=0.48,
                wave_weight=40000.0,
                adversarial_start=1000,
                quantizer_warmup=100,
            )
        raise ValueError(f"unknown SoundStream training preset '{name}': valid presets are tiny, paper")


# ---------------------------------------------------------------------------------------- losses


def code_perplexity(codes: Tensor, codebook_size: int) -> float:
    """``exp(entropy)`` of the code histogram: the number of equally used codes it is worth (1 = a
    collapsed codebook whose tokens carry no information)."""
    p = torch.bincount(codes.reshape(-1), minlength=codebook_size).float() / max(codes.numel(), 1)  # [C]
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def split_real_fake(outputs: list[tuple[Tensor, list[Tensor]]], n: int) -> list[tuple[tuple[Tensor, Tensor], list[tuple[Tensor, Tensor]]]]:
    """Discriminator outputs of ``cat([real, fake])`` -> per discriminator ``((real, fake) logits,
    [(real, fake) feature maps])``; one forward for both halves keeps DDP to one call per backward."""
    return [((logits[:n], logits[n:]), [(f[:n], f[n:]) for f in feats]) for logits, feats in outputs]


def discriminator_hinge(split: list) -> Tensor:
    return torch.stack([F.relu(1 - real).mean() + F.relu(1 + fake).mean() for (real, fake), _ in split]).mean()


def generator_hinge(split: list) -> Tensor:
    return torch.stack([F.relu(1 - fake).mean() for (_, fake), _ in split]).mean()


def feature_matching(split: list) -> Tensor:
    """SoundStream's L_feat: mean absolute difference between the feature maps of real and decoded
    audio, averaged over the layers of each discriminator and over the discriminators."""
    per_disc = [torch.stack([(real.detach() - fake).abs().mean() for real, fake in feats]).mean() for _, feats in split]
    return torch.stack(per_disc).mean()


# ---------------------------------------------------------------------------------------- learner


class SoundStreamLearner:
    """The ``Learner`` of SoundStream (see docs/interfaces.md): random crops, GAN training, export."""

    kind = "soundstream"

    def __init__(
        self,
        preset: str,
        device: torch.device | str = "cpu",
        wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m,
        **options: Any,
    ):
        self.preset = preset
        self.device = torch.device(device)
        # options name training settings or, for comparisons such as quantizer="ema", model settings
        train_fields = {f.name for f in dataclasses.fields(SoundStreamTrainingConfig)}
        model_fields = {f.name for f in dataclasses.fields(SoundStreamConfig)} - {"sample_rate"}
        unknown = set(options) - train_fields - model_fields
        if unknown:
            raise TypeError(
                f"SoundStreamLearner got unknown option(s) {sorted(unknown)}; valid: {sorted(train_fields | model_fields)}"
            )
        self.config = dataclasses.replace(
            SoundStreamConfig.preset(preset), **{k: v for k, v in options.items() if k in model_fields}
        )
        self.train_config = dataclasses.replace(
            SoundStreamTrainingConfig.preset(preset), **{k: v for k, v in options.items() if k in train_fields}
        )
        tc = self.train_config
        self.batch_size = tc.batch_size
        self.crop_samples = max(ACOUSTIC_HOP, int(tc.crop_seconds * SAMPLE_RATE) // ACOUSTIC_HOP * ACOUSTIC_HOP)
        torch.manual_seed(tc.seed)
        self.rng = np.random.default_rng(tc.seed)
        self.model = SoundStream(self.config).to(self.device)
        self.discriminator = SoundStreamDiscriminator(self.config).to(self.device)
        self.generator_train = wrap_model(self.model)
        self.discriminator_train = wrap_model(self.discriminator)
        self.mel = MultiScaleMel(tuple(tc.mel_scales), tc.n_mels).to(self.device)
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=tc.lr, betas=tc.betas, fused=True)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=tc.disc_lr, betas=tc.betas, fused=True)
        self.step = 0
        self._init_batches: list[Tensor] = []  # recent warm-up batches (CPU) for the k-means fit

    # -------------------------------------------------------------- data
    def collate(self, samples: list[dict]) -> Tensor:
        """Decoded audio samples (``{"wav": float32[T], ...}``) -> random crops ``[B, crop]``; audio shorter
        than the crop is zero-padded at the end."""
        if not samples:
            raise ValueError("SoundStreamLearner.collate got no samples")
        crops = []
        for sample in samples:
            if "wav" not in sample:
                raise KeyError(f"sample {sample.get('__key__', '?')} has no 'wav': SoundStream trains on audio shards")
            wav = np.asarray(sample["wav"], dtype=np.float32).reshape(-1)
            if wav.shape[0] <= self.crop_samples:
                crops.append(np.pad(wav, (0, self.crop_samples - wav.shape[0])))
            else:
                start = int(self.rng.integers(0, wav.shape[0] - self.crop_samples + 1))
                crops.append(wav[start : start + self.crop_samples])
        return torch.from_numpy(np.stack(crops))  # [B, crop]

    # -------------------------------------------------------------- steps
    def _clip(self, module: nn.Module) -> float:
        return float(torch.nn.utils.clip_grad_norm_(module.parameters(), self.train_config.grad_clip))

    @torch.no_grad()
    def _fit_quantizer(self, current: Tensor) -> None:
        """k-means on the latents of the recent warm-up batches and this one: every RVQ level starts at
        centroids of the residuals the trained encoder actually produces."""
        wavs = [b.to(self.device) for b in self._init_batches] + [current]
        latents = torch.cat([self.model.encoder(self.model._frames(w)).transpose(1, 2).flatten(0, 1) for w in wavs])
        self.model.quantizer.fit(latents, iters=10, seed=self.train_config.seed)  # [N, D]
        self._init_batches.clear()

    def train_step(self, batch: Tensor) -> dict[str, float]:
        tc = self.train_config
        wav = batch.to(self.device)
        self.model.train()
        self.discriminator.train()
        warming_up = self.step < tc.quantizer_warmup
        if warming_up:
            self._init_batches = (self._init_batches + [batch.detach().cpu()])[-tc.init_batches :]
        elif tc.quantizer_warmup > 0 and self.step == tc.quantizer_warmup:
            self._fit_quantizer(wav)
        recon, codes, commit = self.generator_train(wav, quantize=not warming_up)
        target = wav[:, : recon.shape[-1]]
        mel_loss, mel_distance = self.mel(target, recon)
        wave_l1 = (recon - target).abs().mean()
        loss = tc.mel_weight * mel_loss + tc.wave_weight * wave_l1 + commit
        metrics = {
            "mel_loss": mel_loss.item(),
            "mel_distance": mel_distance.item(),
            "wave_l1": wave_l1.item(),
            "commit_loss": commit.item(),
        }
        adversarial = self.step >= tc.adversarial_start
        n = wav.shape[0]
        if adversarial:
            split = split_real_fake(self.discriminator_train(torch.cat([target, recon])), n)
            adv, feat = generator_hinge(split), feature_matching(split)
            loss = loss + tc.adversarial_weight * adv + tc.feature_weight * feat
            metrics.update(adv_loss=adv.item(), feature_loss=feat.item())
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        metrics["grad_norm"] = self._clip(self.model)
        self.opt_g.step()
        metrics["loss"] = loss.item()
        if adversarial:
            split = split_real_fake(self.discriminator_train(torch.cat([target, recon.detach()])), n)
            d_loss = discriminator_hinge(split)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self._clip(self.discriminator)
            self.opt_d.step()
            metrics["disc_loss"] = d_loss.item()
        level0 = codes[:, 0]
        metrics["codes_used_level0"] = float(level0[level0 >= 0].unique().numel())
        metrics["levels_mean"] = float((codes[:, :, 0] >= 0).sum(dim=1).float().mean())  # quantizer dropout
        self.step += 1
        metrics["step"] = float(self.step)
        return metrics

    @torch.no_grad()
    def eval_step(self, batch: Tensor) -> dict[str, float]:
        """Reconstruction quality through the full token path (encode -> 12 levels -> decode)."""
        wav = batch.to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            codes = self.model.encode(wav)  # [B, K, F]
            recon = self.model.decode(codes)
        finally:
            self.model.train(was_training)
        target = wav[:, : recon.shape[-1]]
        mel_distance = self.mel.distance(target, recon).mean()
        snr = si_snr(recon, target)
        return {
            "mel_distance": float(mel_distance),
            "si_snr": float(snr[torch.isfinite(snr)].mean()) if torch.isfinite(snr).any() else -math.inf,
            "wave_l1": float((recon - target).abs().mean()),
            "codes_perplexity_l0": code_perplexity(codes[:, 0], self.config.codebook_size),
        }

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "step": self.step,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.step = int(state["step"])
        self.rng.bit_generator.state = state["rng"]

    def export(self, out_dir: str) -> None:
        save_artifact(
            out_dir,
            kind=self.kind,
            preset=self.preset,
            config=self.config,
            state_dict=self.model.state_dict(),
            meta={"step": self.step, "training": dataclasses.asdict(self.train_config)},
        )
