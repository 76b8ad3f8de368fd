"""Residual vector quantization (RVQ), the quantizer of SoundStream's acoustic tokens (12 x 1024) and
of MuLan's conditioning tokens (12 x 1024).

Each level quantizes what the previous levels left over, so the reconstruction is the sum of one code
vector per level and coarse levels carry most of the signal (what lets the coarse acoustic stage model
only the first 4 levels). Codebooks are learned as in SoundStream / VQ-VAE-2: exponential moving
averages of cluster sizes and sums (no gradient), k-means initialisation from the first training batch,
and replacement of dead codes by vectors of the current batch. Gradients pass to the encoder with the
straight-through estimator; a commitment loss pulls the encoder output toward its codes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm.tokenizers.kmeans import KMeans, nearest


class RVQOutput(NamedTuple):
    quantized: Tensor  # [B, N, D]  (straight-through: gradients reach the input)
    codes: Tensor  # [B, N, K] long; -1 on levels dropped by quantizer dropout
    commit_loss: Tensor  # scalar


class VectorQuantizer(nn.Module):
    """One codebook of ``codebook_size`` vectors, learned by EMA (decay 0.99) rather than by gradient."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        decay: float = 0.99,
        kmeans_init: bool = True,
        dead_code_threshold: float = 2.0,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.decay = decay
        self.kmeans_init = kmeans_init
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps
        codebook = torch.zeros(codebook_size, dim) if kmeans_init else torch.randn(codebook_size, dim)
        self.register_buffer("codebook", codebook)  # [C, D]
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # [C]  EMA of code usage
        self.register_buffer("embed_sum", codebook.clone())  # [C, D]  EMA of assigned vector sums
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    @torch.no_grad()
    def init_codebook(self, x: Tensor, iters: int = 10, seed: int = 0) -> Tensor:
        """Set the codebook by k-means on ``x[N, D]`` (used at the first training batch and by
        ``ResidualVQ.fit``). Returns the codes of ``x``."""
        km = KMeans(self.codebook_size, self.dim).to(x.device).fit(x.float(), iters=iters, seed=seed)
        codes = km.assign(x)
        counts = torch.bincount(codes, minlength=self.codebook_size).to(x.dtype)  # [C]
        self.codebook.copy_(km.centroids)
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(km.centroids * counts[:, None])
        self.initted.fill_(True)
        return codes

    def quantize(self, x: Tensor) -> Tensor:
        """Nearest code index for ``x[..., D]`` -> long ``[...]``."""
        flat = x.detach().reshape(-1, self.dim).to(self.codebook.dtype)  # [N, D]
        return nearest(flat, self.codebook)[0].reshape(x.shape[:-1])  # [...]

    def dequantize(self, codes: Tensor) -> Tensor:
        """Code vectors for ``codes[...]`` -> ``[..., D]``; code -1 (a dropped level) maps to zeros."""
        valid = codes >= 0
        vectors = F.embedding(codes.clamp_min(0), self.codebook)  # [..., D]
        return vectors * valid.unsqueeze(-1).to(vectors.dtype)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, codes: Tensor) -> None:
        counts = torch.bincount(codes, minlength=self.codebook_size).to(flat.dtype)  # [C]
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat)  # [C, D]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.codebook.copy_(self.embed_sum / smoothed[:, None])

    @torch.no_grad()
    def _replace_dead_codes(self, flat: Tensor) -> int:
        """Codes whose EMA usage fell below the threshold restart at random vectors of this batch."""
        if self.dead_code_threshold <= 0:
            return 0
        dead = self.cluster_size < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        pick = torch.randint(flat.shape[0], (n_dead,), device=flat.device)
        self.codebook[dead] = flat[pick]
        self.cluster_size[dead] = self.dead_code_threshold
        self.embed_sum[dead] = flat[pick] * self.dead_code_threshold
        return n_dead

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x[..., D] -> (quantized[..., D] (no straight-through), codes[...], commitment mse)``.

        In training mode this also updates the codebook (k-means init, EMA, dead codes)."""
        flat = x.detach().reshape(-1, self.dim).float()  # [N, D]
        if self.training and not bool(self.initted):
            self.init_codebook(flat)
        codes = nearest(flat, self.codebook)[0]  # [N]
        if self.training:
            self._ema_update(flat, codes)
            self._replace_dead_codes(flat)
        codes = codes.reshape(x.shape[:-1])  # [...]
        quantized = F.embedding(codes, self.codebook).to(x.dtype)  # [..., D]
        commit = F.mse_loss(x, quantized.detach())
        return quantized, codes, commit


class ResidualVQ(nn.Module):
    """``num_quantizers`` VectorQuantizers, each applied to the residual of the ones before it."""

    def __init__(
        self,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        decay: float = 0.99,
        commitment_weight: float = 1.0,
        kmeans_init: bool = True,
        dead_code_threshold: float = 2.0,
        quantizer_dropout: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.num_quantizers = num_quantizers
        self.codebook_size = codebook_size
        self.commitment_weight = commitment_weight
        self.quantizer_dropout = quantizer_dropout
        self.layers = nn.ModuleList(
            VectorQuantizer(dim, codebook_size, decay, kmeans_init, dead_code_threshold)
            for _ in range(num_quantizers)
        )

    @property
    def codebooks(self) -> Tensor:
        """All codebooks stacked: ``[K, C, D]``."""
        return torch.stack([layer.codebook for layer in self.layers])

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"ResidualVQ(dim={self.dim}) got vectors of size {x.shape[-1]}")

    def forward(self, x: Tensor, n_q: int | None = None) -> RVQOutput:
        """Quantize ``x[B, N, D]`` with the first ``n_q`` levels (all by default; in training with
        quantizer dropout a random ``n_q ~ U[1, K]`` per batch, as SoundStream does so that one model
        serves every bitrate)."""
        self._check(x)
        if n_q is None:
            n_q = self.num_quantizers
            if self.training and self.quantizer_dropout:
                n_q = int(torch.randint(1, self.num_quantizers + 1, (1,)))
        residual = x
        total = torch.zeros_like(x)
        codes = torch.full((*x.shape[:-1], self.num_quantizers), -1, dtype=torch.long, device=x.device)
        losses = []
        for k, layer in enumerate(self.layers[:n_q]):
            q, c, commit = layer(residual)
            residual = residual - q.detach()
            total = total + q.detach()
            codes[..., k] = c
            losses.append(commit)
        # one straight-through estimator for the sum: d quantized / d x = identity (not K x identity)
        quantized = x + (total - x).detach()
        commit_loss = torch.stack(losses).mean() * self.commitment_weight
        return RVQOutput(quantized, codes, commit_loss)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """``x[B, N, D] -> codes[B, N, K]`` long, every level."""
        self._check(x)
        residual = x.float()
        codes = []
        for layer in self.layers:
            c = layer.quantize(residual)  # [B, N]
            residual = residual - layer.dequantize(c)
            codes.append(c)
        return torch.stack(codes, dim=-1)  # [B, N, K]

    def decode(self, codes: Tensor) -> Tensor:
        """``codes[B, N, K'] -> [B, N, D]``, the sum of the code vectors of the first ``K' <= K`` levels
        (-1 entries contribute nothing)."""
        if codes.shape[-1] > self.num_quantizers:
            raise ValueError(f"codes have {codes.shape[-1]} levels, this RVQ has {self.num_quantizers}")
        if codes.numel() and int(codes.max()) >= self.codebook_size:
            raise ValueError(f"code {int(codes.max())} out of range for codebook size {self.codebook_size}")
        out = torch.zeros(*codes.shape[:-1], self.dim, device=codes.device, dtype=self.layers[0].codebook.dtype)
        for k in range(codes.shape[-1]):
            out = out + self.layers[k].dequantize(codes[..., k])
        return out

    @torch.no_grad()
    def fit(self, x: Tensor, iters: int = 20, seed: int = 0) -> ResidualVQ:
        """Fit every level offline by k-means on successive residuals of ``x[N, D]`` (MuLan's RVQ, fitted
        on a corpus of embeddings). Works for ``N < codebook_size`` (surplus codes are jittered copies)."""
        if x.ndim != 2:
            raise ValueError(f"ResidualVQ.fit expects [N, {self.dim}] data, got {tuple(x.shape)}")
        self._check(x)
        residual = x.detach().float().to(self.layers[0].codebook.device)
        for k, layer in enumerate(self.layers):
            codes = layer.init_codebook(residual, iters=iters, seed=seed + k)
            residual = residual - layer.dequantize(codes)
        return self
