"""Residual vector quantization (RVQ), the quantizer of SoundStream's acoustic tokens (12 x 1024) and
of MuLan's conditioning tokens (12 x 1024).

Each level quantizes what the previous levels left over, so the reconstruction is the sum of one code
vector per level and coarse levels carry most of the signal (what lets the coarse acoustic stage model
only the first 4 levels). Two kinds of levels share the ``ResidualVQ`` mechanism:

* ``VectorQuantizer`` (SoundStream / VQ-VAE-2): codebooks learned as exponential moving averages of
  cluster sizes and sums (no gradient), k-means initialisation from the first training batch,
  replacement of dead codes by vectors of the current batch; gradients pass to the encoder with the
  straight-through estimator and a commitment loss pulls the encoder output toward its codes.
* ``FactorizedVectorQuantizer`` (DAC): low-dimensional, L2-normalised codes learned by gradient.

Quantizer dropout (SoundStream §3.3): in training each example keeps a random prefix of ``n_q ~ U[1, K]``
levels, so that one model decodes any number of levels (a bitrate-scalable codec).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm.tokenizers.kmeans import KMeans, nearest


def _masked_mse(a: Tensor, b: Tensor, mask: Tensor | None) -> Tensor:
    """Mean squared error over the vectors ``[..., D]`` that ``mask[...]`` keeps (all when None)."""
    if mask is None:
        return F.mse_loss(a, b)
    err = (a - b).pow(2).mean(dim=-1)  # [...]
    return (err * mask).sum() / mask.sum().clamp_min(1)


def touch(*modules: nn.Module) -> Tensor:
    """``0 x`` the sum of the modules' parameters: a zero loss term through which every parameter takes
    part in the backward pass. DistributedDataParallel (without ``find_unused_parameters``) fails on
    parameters that got no gradient, as the levels that quantizer dropout skipped would."""
    params = [p.sum() for m in modules for p in m.parameters() if p.requires_grad]
    return torch.stack(params).sum() * 0.0 if params else torch.zeros(())


class RVQOutput(NamedTuple):
    quantized: Tensor  # [B, N, D]  (straight-through: gradients reach the input)
    codes: Tensor  # [B, N, K] long; -1 on levels dropped by quantizer dropout
    commit_loss: Tensor  # scalar


class VectorQuantizer(nn.Module):
    """One codebook of ``codebook_size`` vectors, learned by EMA (decay 0.99) rather than by gradient.

    ``dead_code_threshold`` is in vectors per step (the EMA of a code's usage): a code used less is
    restarted at a vector of the current batch, and its usage is reset to twice the threshold so that
    it gets ~70 steps (decay 0.99) to be picked before it may be restarted again.
    """

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
        # duplicates of one batch vector must differ, or only one of them could ever win
        vectors = flat[pick] + 1e-3 * flat.std() * torch.randn(n_dead, self.dim, device=flat.device)
        self.codebook[dead] = vectors
        self.cluster_size[dead] = 2 * self.dead_code_threshold
        self.embed_sum[dead] = vectors * 2 * self.dead_code_threshold
        return n_dead

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``x[..., D] -> (quantized[..., D] (no straight-through), codes[...], commitment mse)``.

        ``mask[...]`` (bool) marks the vectors this level quantizes (quantizer dropout): the others get
        code -1 and a zero vector, and take no part in the codebook update or the loss. In training
        mode this also updates the codebook (k-means init, EMA, dead codes)."""
        flat = x.detach().reshape(-1, self.dim).to(self.codebook.dtype)  # [N, D]
        active = None if mask is None else mask.reshape(-1)  # [N]
        if self.training:
            used = flat if active is None else flat[active]  # [n, D]
            if used.shape[0]:
                if not bool(self.initted):
                    self.init_codebook(used)
                self._ema_update(used, nearest(used, self.codebook)[0])
                self._replace_dead_codes(used)
        codes = nearest(flat, self.codebook)[0]  # [N]
        if active is not None:
            codes = torch.where(active, codes, -1)
        codes = codes.reshape(x.shape[:-1])  # [...]
        quantized = self.dequantize(codes).to(x.dtype)  # [..., D]
        return quantized, codes, _masked_mse(x, quantized.detach(), mask)


class ResidualVQ(nn.Module):
    """``num_quantizers`` VectorQuantizers, each applied to the residual of the ones before it."""

    # EMA codebooks learn without gradients: one straight-through estimator carries the encoder's
    straight_through = True

    def __init__(
        self,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        decay: float = 0.99,
        commitment_weight: float = 1.0,
        kmeans_init: bool = True,
        dead_code_threshold: float = 2.0,
        quantizer_dropout: float = 0.0,
        make_layer: Callable[[], nn.Module] | None = None,
    ):
        super().__init__()
        self.dim = dim
        self.num_quantizers = num_quantizers
        self.codebook_size = codebook_size
        self.commitment_weight = commitment_weight
        self.quantizer_dropout = quantizer_dropout
        make_layer = make_layer or (lambda: VectorQuantizer(dim, codebook_size, decay, kmeans_init, dead_code_threshold))
        self.layers = nn.ModuleList(make_layer() for _ in range(num_quantizers))

    @property
    def codebooks(self) -> Tensor:
        """All codebooks stacked: ``[K, C, D]``."""
        return torch.stack([layer.codebook for layer in self.layers])

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"ResidualVQ(dim={self.dim}) got vectors of size {x.shape[-1]}")

    def _levels(self, n_q: int | None) -> int:
        n_q = self.num_quantizers if n_q is None else int(n_q)
        if not 1 <= n_q <= self.num_quantizers:
            raise ValueError(f"this RVQ has levels 1..{self.num_quantizers}, asked for {n_q}")
        return n_q

    def dropout_levels(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """Levels kept per example ``long[B]``: ``U[1, K]`` for a ``quantizer_dropout`` fraction of the
        examples (SoundStream: all of them), ``K`` for the rest."""
        keep = torch.full((batch,), self.num_quantizers, dtype=torch.long, device=device)
        drawn = torch.randint(1, self.num_quantizers + 1, (batch,), device=device)
        dropped = torch.rand(batch, device=device) < float(self.quantizer_dropout)
        return torch.where(dropped, drawn, keep)

    def forward(self, x: Tensor, n_q: int | None = None) -> RVQOutput:
        """Quantize ``x[B, N, D]`` with the first ``n_q`` levels (all by default). In training with
        quantizer dropout each example keeps its own random prefix of levels (``dropout_levels``) and
        the dropped levels' codes are -1."""
        self._check(x)
        n_q = self._levels(n_q)
        keep = None
        if self.training and self.quantizer_dropout and x.ndim >= 2:
            keep = self.dropout_levels(x.shape[0], x.device).clamp_max(n_q)  # [B]
            n_q = int(keep.max())
        residual = x
        total = torch.zeros_like(x)
        codes = torch.full((*x.shape[:-1], self.num_quantizers), -1, dtype=torch.long, device=x.device)
        losses = []
        for k, layer in enumerate(self.layers[:n_q]):
            if keep is None:
                q, c, commit = layer(residual)
            else:
                mask = (keep > k).reshape(-1, *([1] * (x.ndim - 2))).expand(x.shape[:-1])  # [B] -> [B, N]
                q, c, commit = layer(residual, mask)
            if self.straight_through:
                q = q.detach()
            residual = residual - q
            total = total + q
            codes[..., k] = c
            losses.append(commit)
        # one straight-through estimator for the sum: d quantized / d x = identity (not K x identity)
        quantized = x + (total - x).detach() if self.straight_through else total
        commit_loss = torch.stack(losses).mean() * self.commitment_weight
        if self.training:
            commit_loss = commit_loss + touch(*self.layers[n_q:])
        return RVQOutput(quantized, codes, commit_loss)

    @torch.no_grad()
    def encode(self, x: Tensor, n_q: int | None = None) -> Tensor:
        """``x[B, N, D] -> codes[B, N, n_q]`` long, the first ``n_q`` levels (all by default)."""
        self._check(x)
        residual = x.to(self.layers[0].codebook.dtype)
        codes = []
        for layer in self.layers[: self._levels(n_q)]:
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


# ---------------------------------------------------------------------------------------- factorized codes


class FactorizedVectorQuantizer(nn.Module):
    """One codebook with DAC's factorized, L2-normalised codes (Kumar et al., 2023), learned by gradient.

    The ``dim``-sized input is projected to ``code_dim`` (8) dimensions, and the nearest code is the one
    of highest cosine similarity there; the code vector is projected back to ``dim``. Why: with
    SoundStream's EMA codebooks a small codec trained on small batches collapses to a handful of codes
    (a 1024-way nearest neighbour in 64-d Euclidean space is won by the few codes nearest to a latent
    cloud whose scale keeps changing). Matching directions in a low-dimensional space makes every code
    reachable and scale-free, and the codebook loss moves codes with the encoder instead of lagging it.
    Codes unused for a while (EMA usage below ``dead_code_threshold`` vectors per step) are restarted at
    projected vectors of the current batch, and their usage is reset to twice the threshold, so a
    restarted code gets ~70 steps (decay 0.99) to be picked before it may be restarted again.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        code_dim: int = 8,
        decay: float = 0.99,
        dead_code_threshold: float = 0.01,
    ):
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.decay = decay
        self.dead_code_threshold = dead_code_threshold
        self.in_proj = nn.Linear(dim, code_dim)
        # centres and scales the projected latents (running statistics at inference, so encoding stays
        # frame-by-frame): without it the encoder's latents drift to one large shared offset, all
        # directions coincide and every frame picks the same code
        self.norm = nn.BatchNorm1d(code_dim, affine=False)
        self.out_proj = nn.Linear(code_dim, dim)
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim))  # [C, d]
        self.register_buffer("usage", torch.full((codebook_size,), 2 * dead_code_threshold))  # [C] EMA

    def project(self, x: Tensor) -> Tensor:
        """``x[..., D] -> [..., d]`` unit vectors: the space where codes are matched."""
        h = self.in_proj(x)  # [..., d]
        if self.training and h.numel() == h.shape[-1]:
            return F.normalize(h, dim=-1)  # batch statistics need more than one vector
        h = self.norm(h.reshape(-1, self.code_dim)).reshape(h.shape)  # [N, d] -> [..., d]
        return F.normalize(h, dim=-1)

    def nearest_code(self, z: Tensor) -> Tensor:
        """Highest-cosine code of unit vectors ``z[..., d]`` -> long ``[...]``."""
        flat = z.detach().reshape(-1, self.code_dim)  # [N, d]
        scores = flat @ F.normalize(self.codebook.detach(), dim=-1).T  # [N, C]
        return scores.argmax(dim=-1).reshape(z.shape[:-1])  # [...]

    def quantize(self, x: Tensor) -> Tensor:
        """Code index of ``x[..., D]`` -> long ``[...]``."""
        return self.nearest_code(self.project(x))

    def code_vectors(self, codes: Tensor) -> Tensor:
        """``codes[...] -> [..., d]`` normalised code vectors (the values the encoder is pulled to)."""
        return F.normalize(F.embedding(codes.clamp_min(0), self.codebook), dim=-1)

    def dequantize(self, codes: Tensor) -> Tensor:
        """Code vectors for ``codes[...]`` projected back -> ``[..., D]``; code -1 maps to zeros."""
        valid = (codes >= 0).unsqueeze(-1)
        return self.out_proj(self.code_vectors(codes)) * valid.to(self.codebook.dtype)

    @torch.no_grad()
    def _replace_dead_codes(self, z: Tensor, codes: Tensor) -> int:
        flat = z.detach().reshape(-1, self.code_dim)  # [N, d]
        counts = torch.bincount(codes.reshape(-1), minlength=self.codebook_size).to(self.usage.dtype)  # [C]
        self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.dead_code_threshold <= 0:
            return 0
        dead = self.usage < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        pick = torch.randint(flat.shape[0], (n_dead,), device=flat.device)
        noise = 0.05 * torch.randn(n_dead, self.code_dim, device=flat.device)  # duplicates must differ
        self.codebook[dead] = F.normalize(flat[pick] + noise, dim=-1)
        self.usage[dead] = 2 * self.dead_code_threshold
        return n_dead

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``x[..., D] -> (quantized[..., D] (straight-through to x), codes[...], VQ loss)``.

        The loss is DAC's: codebook term ``|sg(z) - e|^2`` (moves codes) + 0.25 commitment
        ``|z - sg(e)|^2`` (moves the encoder). ``mask[...]`` keeps vectors as in ``VectorQuantizer``.
        Training mode also restarts dead codes."""
        z = self.project(x)  # [..., d]
        codes = self.nearest_code(z)  # [...]
        e = self.code_vectors(codes)  # [..., d]
        loss = _masked_mse(e, z.detach(), mask) + 0.25 * _masked_mse(z, e.detach(), mask)
        if self.training:
            if mask is None:
                self._replace_dead_codes(z, codes)
            elif bool(mask.any()):
                self._replace_dead_codes(z[mask], codes[mask])
        z_q = z + (e - z).detach()  # straight-through in the code space
        if mask is None:
            return self.out_proj(z_q), codes, loss
        return self.out_proj(z_q) * mask.unsqueeze(-1).to(z_q.dtype), torch.where(mask, codes, -1), loss

    @torch.no_grad()
    def init_codebook(self, x: Tensor, iters: int = 10, seed: int = 0) -> Tensor:
        """Codes by k-means on the projected unit vectors of ``x[N, D]``; returns the codes of ``x``."""
        z = self.project(x.float())  # [N, d]
        km = KMeans(self.codebook_size, self.code_dim).to(x.device).fit(z, iters=iters, seed=seed)
        self.codebook.copy_(F.normalize(km.centroids, dim=-1))
        self.usage.fill_(2 * self.dead_code_threshold)
        return self.quantize(x)


class FactorizedResidualVQ(ResidualVQ):
    """``ResidualVQ`` with factorized codes at every level (DAC): same interface (``forward`` ->
    ``RVQOutput``, ``encode``, ``decode``, ``fit``), gradient-trained codebooks. The residual keeps its
    gradient, so every level's projections learn from the reconstruction loss."""

    straight_through = False

    def __init__(
        self,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        code_dim: int = 8,
        commitment_weight: float = 1.0,
        dead_code_threshold: float = 0.01,
        quantizer_dropout: float = 0.0,
        decay: float = 0.99,
    ):
        super().__init__(
            dim, num_quantizers, codebook_size, commitment_weight=commitment_weight,
            quantizer_dropout=quantizer_dropout,
            make_layer=lambda: FactorizedVectorQuantizer(dim, codebook_size, code_dim, decay, dead_code_threshold),
        )

    @property
    def codebooks(self) -> Tensor:
        """All code-space codebooks, normalised: ``[K, C, d]``."""
        return torch.stack([F.normalize(layer.codebook.detach(), dim=-1) for layer in self.layers])

