"""K-means: the quantizer that turns w2v-BERT embeddings into MusicLM's semantic tokens (1024 centroids),
and the offline fitter behind every RVQ level (MuLan's 12 x 1024 RVQ, SoundStream's codebook init).

Two fitting paths share one initialisation (k-means++ on a sample):

* a tensor ``x[N, D]``: full-batch Lloyd iterations (exact, for data that fits in memory);
* an iterable of ``[n, D]`` batches: mini-batch k-means (Sculley, 2010), so that a million frames of
  embeddings are streamed through and never held in memory at once.

Distances are computed in chunks as ``|x|^2 - 2 x.c + |c|^2`` so that ``[N, k]`` is never materialised
for large ``N``. Everything is deterministic for a given ``seed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

_CHUNK_ELEMENTS = 1 << 22  # rows per distance chunk = this / k: bounds the [rows, k] matrix to ~16 MB


def squared_distances(x: Tensor, centroids: Tensor) -> Tensor:
    """``[n, D] x [k, D] -> [n, k]`` squared Euclidean distances, clamped at 0 (rounding)."""
    d = x.pow(2).sum(-1, keepdim=True) - 2.0 * x @ centroids.T + centroids.pow(2).sum(-1)[None, :]
    return d.clamp_min_(0.0)


def nearest(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the nearest centroid and its squared distance for every row of ``x[N, D]``, in chunks."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, centroids.shape[0]))
    idx, dist = [], []
    for start in range(0, x.shape[0], rows):
        d = squared_distances(x[start : start + rows], centroids)  # [rows, k]
        m, i = d.min(dim=-1)
        idx.append(i)
        dist.append(m)
    if not idx:
        return torch.zeros(0, dtype=torch.long, device=x.device), torch.zeros(0, device=x.device)
    return torch.cat(idx), torch.cat(dist)


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): each new centroid is drawn with probability
    proportional to its squared distance from the centroids chosen so far.

    With fewer distinct points than ``k`` the surplus centroids are jittered copies of data points,
    so that fitting 1024 centroids to a few hundred embeddings (MuLan's RVQ on a small corpus) works.
    """
    n, dim = x.shape
    if n == 0:
        raise ValueError("k-means needs at least one data point")
    # k sequential steps of tiny operations: numpy does them ~20x faster than torch's dispatcher
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    data = x.detach().cpu().double().numpy()
    picked = [int(rng.integers(n))]
    closest = ((data - data[picked[0]]) ** 2).sum(-1)  # [n]; exact zeros for duplicates
    while len(picked) < k:
        cumulative = np.cumsum(closest)  # [n]
        total = cumulative[-1]
        if not np.isfinite(total) or total <= 0:
            break  # every point coincides with a centroid: no distinct point left
        # inverse-CDF draw: index i with probability closest[i] / total
        i = min(int(np.searchsorted(cumulative, rng.random() * total, side="right")), n - 1)
        picked.append(i)
        np.minimum(closest, ((data - data[i]) ** 2).sum(-1), out=closest)
    centroids = torch.empty(k, dim, dtype=x.dtype, device=x.device)
    chosen = len(picked)
    centroids[:chosen] = x[torch.tensor(picked, device=x.device)]
    if chosen < k:
        centroids[chosen:] = jittered_copies(x, k - chosen, generator)
    return centroids


def jittered_copies(x: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` random rows of ``x`` plus small Gaussian noise (1e-3 of the data's spread)."""
    idx = torch.randint(x.shape[0], (count,), generator=generator)
    scale = float(x.std()) if x.numel() > 1 else 0.0
    scale = 1e-3 * scale if scale > 0 else 1e-6
    noise = torch.randn(count, x.shape[1], generator=generator, dtype=x.dtype) * scale
    return x[idx] + noise.to(x.device)


class KMeans(nn.Module):
    """``k`` centroids in ``dim`` dimensions; a module so that they travel in state dicts and artifacts."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        if k < 1 or dim < 1:
            raise ValueError(f"KMeans needs k >= 1 and dim >= 1, got k={k}, dim={dim}")
        self.k = k
        self.dim = dim
        self.register_buffer("centroids", torch.zeros(k, dim))
        self.register_buffer("fitted", torch.tensor(False))

    # ------------------------------------------------------------------ fitting
    @torch.no_grad()
    def fit(
        self,
        x: Tensor | Iterable[Tensor],
        iters: int = 20,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> KMeans:
        """Fit the centroids.

        ``x`` a tensor ``[N, D]``: full-batch Lloyd for ``iters`` iterations (stops early once no point
        changes cluster); with ``batch_size`` it runs mini-batch k-means over ``iters`` shuffled passes
        instead. ``x`` an iterable of ``[n, D]`` batches: mini-batch k-means; a re-iterable (list,
        DataLoader) gets ``iters`` passes, a one-shot iterator (generator) a single pass.
        """
        generator = torch.Generator().manual_seed(seed)
        if isinstance(x, Tensor):
            data = self._check(x)
            init = data[torch.randperm(data.shape[0], generator=generator)[: self._init_sample_size()]]
            self.centroids.copy_(kmeans_plus_plus(init, self.k, generator))
            if data.shape[0] <= self.k:
                pass  # k-means++ already put a centroid on every distinct point: inertia 0, optimal
            elif batch_size is None:
                self._lloyd(data, iters, generator)
            else:
                counts = torch.zeros(self.k, device=data.device)
                for _ in range(max(1, iters)):
                    order = torch.randperm(data.shape[0], generator=generator)
                    for start in range(0, data.shape[0], batch_size):
                        self._minibatch_update(data[order[start : start + batch_size]], counts)
        else:
            self._fit_stream(x, iters, generator)
        self.fitted.fill_(True)
        return self

    def _init_sample_size(self) -> int:
        return max(2 * self.k, 256)  # k-means++ costs k passes over the sample

    def _check(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"KMeans(dim={self.dim}) expects [N, {self.dim}] data, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("KMeans.fit got no data points")
        if not torch.isfinite(x).all():
            raise ValueError("KMeans.fit got non-finite values")
        return x.detach().float().to(self.centroids.device)

    def _lloyd(self, data: Tensor, iters: int, generator: torch.Generator) -> None:
        previous = None
        for _ in range(iters):
            assign, dist = nearest(data, self.centroids)
            sums = torch.zeros_like(self.centroids).index_add_(0, assign, data)  # [k, D]
            counts = torch.bincount(assign, minlength=self.k).to(data.dtype)  # [k]
            new = sums / counts.clamp_min(1)[:, None]
            empty = counts == 0
            n_empty = int(empty.sum())
            if n_empty:
                # an empty cluster takes one of the worst-served points (jittered copies when N < k)
                if data.shape[0] >= self.k:
                    new[empty] = data[dist.argsort(descending=True)[:n_empty]]
                else:
                    new[empty] = jittered_copies(data, n_empty, generator)
            self.centroids.copy_(new)
            if previous is not None and torch.equal(previous, assign):
                break
            previous = assign

    def _minibatch_update(self, batch: Tensor, counts: Tensor) -> None:
        """One Sculley step: every centroid moves toward the mean of its batch points with a
        per-centroid learning rate 1 / (points seen so far)."""
        assign, _ = nearest(batch, self.centroids)
        batch_counts = torch.bincount(assign, minlength=self.k).to(batch.dtype)  # [k]
        sums = torch.zeros_like(self.centroids).index_add_(0, assign, batch)  # [k, D]
        counts += batch_counts
        seen = batch_counts > 0
        rate = (batch_counts[seen] / counts[seen])[:, None]
        means = sums[seen] / batch_counts[seen][:, None]
        self.centroids[seen] = (1 - rate) * self.centroids[seen] + rate * means

    def _fit_stream(self, batches: Iterable[Tensor], iters: int, generator: torch.Generator) -> None:
        reiterable = iter(batches) is not batches
        passes = max(1, iters) if reiterable else 1
        counts = torch.zeros(self.k, device=self.centroids.device)
        stream: Iterator[Tensor] = iter(batches)
        # buffer the first batches as the k-means++ sample; they are then also used for updates
        head: list[Tensor] = []
        have = 0
        for b in stream:
            b = self._check(b)
            head.append(b)
            have += b.shape[0]
            if have >= self._init_sample_size():
                break
        if not head:
            raise ValueError("KMeans.fit got an empty iterable of batches")
        sample = torch.cat(head)
        sample = sample[torch.randperm(sample.shape[0], generator=generator)[: self._init_sample_size()]]
        self.centroids.copy_(kmeans_plus_plus(sample, self.k, generator))
        for b in head:
            self._minibatch_update(b, counts)
        for b in stream:
            self._minibatch_update(self._check(b), counts)
        for _ in range(passes - 1):
            for b in batches:
                self._minibatch_update(self._check(b), counts)

    # ------------------------------------------------------------------ inference
    def _require_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError("KMeans is not fitted: call fit() or load fitted centroids first")

    @torch.no_grad()
    def assign(self, x: Tensor) -> Tensor:
        """Nearest-centroid index for ``x[..., D]`` -> long ``[...]``."""
        self._require_fitted()
        if x.shape[-1] != self.dim:
            raise ValueError(f"KMeans(dim={self.dim}) cannot assign vectors of size {x.shape[-1]}")
        flat = x.detach().reshape(-1, self.dim).to(self.centroids)  # [N, D]
        idx, _ = nearest(flat, self.centroids)
        return idx.reshape(x.shape[:-1])  # [...]

    def forward(self, x: Tensor) -> Tensor:
        return self.assign(x)

    @torch.no_grad()
    def inertia(self, x: Tensor) -> float:
        """Sum of squared distances from each row of ``x[..., D]`` to its nearest centroid."""
        self._require_fitted()
        flat = x.detach().reshape(-1, self.dim).to(self.centroids)  # [N, D]
        return float(nearest(flat, self.centroids)[1].sum())

    def extra_repr(self) -> str:
        return f"k={self.k}, dim={self.dim}"
