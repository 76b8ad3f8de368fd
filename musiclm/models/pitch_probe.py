"""The pitch probe: which pitch class does a coarse acoustic frame play, read from the codec's latent?

Beyond the paper. At the scale a CPU trains, the coarse stage barely uses the melody contour it is given
(0.02 nats/token, ``benchmarks/bench_code_init.py``): its samples follow the melody no better than random
codes do (``benchmarks/bench_pitch_guidance.py``). The codec's latent does carry the pitch (``bench_codec``),
so the melody can be steered in at sampling time instead, as FUDGE (Yang & Klein, 2021) steers a language
model with a classifier of partial sequences:

    p(code | context, pitch)  ∝  p(code | context) · p(pitch | frame so far + code) ^ λ

A coarse frame is drawn level by level (4 codes); the latent it decodes is the sum of its codes' vectors
(``v[q, c]``). Probe ``q`` reads the *partial* latent of levels ``0..q`` and predicts the frame's pitch
class, so while level ``q`` is being drawn every candidate code's ``log p(target | z_<q + v[q, c])`` is
known: the bias the sampler adds to that code's logit (times λ, ``pitch_guidance``).

Each probe is one hidden layer: its first layer is linear, so ``W1 (z + v[q, c])`` is ``W1 z`` plus a
precomputed ``W1 v[q, c]``, and scoring all 1,024 candidates of a token costs one ``[V, H] x [H, 12]``
product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from musiclm.tokenizers.contour import PITCH_CLASSES

__all__ = ["PitchProbe", "PitchProbeConfig"]


@dataclass
class PitchProbeConfig:
    levels: int = 4  # the coarse levels the probes read (one probe per prefix 0..q)
    codebook_size: int = 1024
    latent_dim: int = 64  # the codec's latent width
    hidden: int = 256
    classes: int = PITCH_CLASSES

    @classmethod
    def preset(cls, name: str, levels: int, codebook_size: int, latent_dim: int) -> PitchProbeConfig:
        if name not in ("tiny", "paper"):
            raise ValueError(f"unknown preset '{name}': valid presets are tiny, paper")
        return cls(levels=levels, codebook_size=codebook_size, latent_dim=latent_dim,
                   hidden=256 if name == "tiny" else 1024)


class PitchProbe(nn.Module):
    """``levels`` MLPs ``partial latent [N, D] -> pitch-class logits [N, 12]``, and the code vectors they add."""

    def __init__(self, config: PitchProbeConfig) -> None:
        super().__init__()
        self.config = config
        K, V, D = config.levels, config.codebook_size, config.latent_dim
        self.register_buffer("code_vectors", torch.zeros(K, V, D))  # v[q, c]: what code c of level q adds
        self.register_buffer("mean", torch.zeros(K, D))  # per prefix: the partial latents' statistics
        self.register_buffer("std", torch.ones(K, D))
        self.hidden = nn.ModuleList(nn.Linear(D, config.hidden) for _ in range(K))
        self.out = nn.ModuleList(nn.Linear(config.hidden, config.classes) for _ in range(K))

    def partial_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Coarse codes ``[N, levels]`` -> the latent of levels ``0..q`` for every q, ``[levels, N, D]``."""
        K = self.config.levels
        if codes.ndim != 2 or codes.shape[1] != K:
            raise ValueError(f"codes must be [N, {K}], got shape {tuple(codes.shape)}")
        parts = torch.stack([self.code_vectors[q][codes[:, q]] for q in range(K)])  # [K, N, D]
        return parts.cumsum(0)

    def forward(self, latent: torch.Tensor, level: int) -> torch.Tensor:
        """Partial latent of levels ``0..level`` ``[N, D]`` -> pitch-class logits ``[N, classes]``."""
        x = (latent - self.mean[level]) / self.std[level]
        return self.out[level](torch.relu(self.hidden[level](x)))

    def code_projections(self, level: int) -> torch.Tensor:
        """``W1 v[level, c]`` for every code c, ``[V, H]``: what each candidate adds to the hidden layer
        (compute it once per window and pass it to ``candidate_log_probs``)."""
        return (self.code_vectors[level] / self.std[level]) @ self.hidden[level].weight.T

    def candidate_log_probs(self, latent: torch.Tensor, level: int, target: torch.Tensor,
                            per_code: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(target | latent + v[level, c])`` for every code c: ``latent [B, D]`` (levels < ``level``
        of the frame), ``target [B]`` pitch classes -> ``[B, codebook_size]``; ``per_code``:
        ``code_projections(level)`` when the caller keeps it."""
        hidden, std = self.hidden[level], self.std[level]
        base = hidden((latent - self.mean[level]) / std)  # [B, H]: W1 z + b
        per_code = self.code_projections(level) if per_code is None else per_code  # [V, H]
        h = torch.relu(base[:, None, :] + per_code[None])  # [B, V, H]
        log_probs = self.out[level](h).log_softmax(-1)  # [B, V, classes]
        return log_probs.gather(2, target.long().view(-1, 1, 1).expand(-1, log_probs.shape[1], 1))[..., 0]
