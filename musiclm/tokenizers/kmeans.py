"""K-means: the quantizer that turns w2v-BERT embeddings into MusicLM's semantic tokens (1024 centroids),
and the offline fitter behind every RVQ level (MuLan's 12 x 1024 RVQ, SoundStream's codebook init).

Two fitting paths share one initialisation (k-means++ on a sample):

* a tensor ``x[N, D]``: full-batch Lloyd iterations (exact, for data that fits in memory);
* an iterable of ``[n, D]`` batches: mini-batch k-means (Sculley, 2010), so that a million frames of
  embeddings are streamed through and never held in memory at once;
* :meth:`KMeans.fit_streaming`, for corpus-scale samples on disk: k-means++ on a bounded reservoir
  sample, mini-batch passes, then Lloyd passes whose sums are accumulated chunk by chunk (exact Lloyd
  iterations without the data in memory), and a last pass for the inertia. Memory: one chunk plus the
  centroids and their ``[k, D]`` sums, whatever the number of frames.

Distances are computed in chunks as ``|x|^2 - 2 x.c + |c|^2`` so that ``[N, k]`` is never materialised
for large ``N``. Everything is deterministic for a given ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

_CHUNK_ELEMENTS = 1 << 22  # rows per distance chunk = this / k: bounds the [rows, k] matrix to ~16 MB


def squared_distances(x: Tensor, centroids: Tensor) -> Tensor:
    """``[n, D] x [k, D] -> [n, k]`` squared Euclidean distances, clamped at 0 (rounding)."""
    # one [n, k] buffer, updated in place: a streaming fit calls this thousands of times, and each extra
    # temporary of that size is allocator churn that shows up as resident memory
    d = torch.addmm(centroids.pow(2).sum(-1)[None, :], x, centroids.T, alpha=-2.0)  # [n, k]
    d += x.pow(2).sum(-1, keepdim=True)
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


def reservoir_sample(batches: Iterable[Tensor], size: int, rng: np.random.Generator) -> tuple[Tensor, int]:
    """A uniform sample of ``size`` rows from a stream of ``[n, D]`` batches (Vitter's Algorithm R,
    vectorised per batch): memory ``size x D`` however long the stream. Returns (sample ``[min(size, N), D]``
    float32, ``N`` rows seen)."""
    if size < 1:
        raise ValueError(f"reservoir size must be >= 1, got {size}")
    reservoir: Tensor | None = None
    seen = 0
    for batch in batches:
        batch = torch.as_tensor(batch).detach().float().cpu()
        n = batch.shape[0]
        if n == 0:
            continue
        if reservoir is None:
            reservoir = torch.empty(size, batch.shape[1])
        filled = min(seen, size)
        fill = min(n, size - filled)
        reservoir[filled : filled + fill] = batch[:fill]
        rest = np.arange(seen + fill, seen + n)  # global indices of the rows past the fill
        if rest.size:
            slots = (rng.random(rest.size) * (rest + 1)).astype(np.int64)  # uniform in [0, i]
            keep = np.flatnonzero(slots < size)
            # rows are offered in order: for a slot drawn twice the later row wins, as in the sequential algorithm
            slots_kept = slots[keep]
            _, last = np.unique(slots_kept[::-1], return_index=True)
            chosen = keep[::-1][last]
            reservoir[torch.from_numpy(slots[chosen])] = batch[torch.from_numpy(fill + chosen)]
        seen += n
    if reservoir is None:
        return torch.zeros(0, 0), 0
    return reservoir[: min(seen, size)], seen


@dataclass
class StreamingFitStats:
    """What :meth:`KMeans.fit_streaming` did (saved in the artifact's meta)."""

    frames: int  # rows in one pass over the data
    init_sample: int  # rows of the reservoir k-means++ was seeded from
    minibatch_passes: int
    lloyd_passes: int  # Lloyd passes run (may stop early)
    reads: int  # passes over the data in all, the init and the inertia pass included
    inertia: float  # sum of squared distances to the nearest centroid, final centroids
    inertia_per_frame: float
    empty_clusters: int  # centroids nearest to no frame at the end
    reassigned: int  # centroids moved to a far reservoir point because no frame chose them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    @torch.no_grad()
    def fit_streaming(
        self,
        batches: Callable[[int], Iterable[Tensor]],
        *,
        minibatch_passes: int = 2,
        lloyd_passes: int = 3,
        init_size: int | None = None,
        seed: int = 0,
        tol: float = 1e-4,
    ) -> StreamingFitStats:
        """Fit on data too large for memory, read again for every pass.

        ``batches(epoch)`` returns a fresh iterable of ``[n, D]`` batches over the whole data (the
        source may shuffle its order by ``epoch``). Pass 0 fills a reservoir of ``init_size`` rows
        (default ``max(2k, 256)``) for k-means++; then ``minibatch_passes`` of Sculley's updates move the
        centroids close to a solution cheaply, and ``lloyd_passes`` exact Lloyd iterations (sums and
        counts accumulated batch by batch) refine them, stopping once the inertia improves by less than
        ``tol`` (relative). A centroid no row chose in a pass is moved to a reservoir point drawn with
        probability proportional to its squared distance from the centroids (the k-means++ rule), so
        none stays dead. A last pass measures the inertia of the final centroids.
        """
        rng = np.random.default_rng(seed)
        generator = torch.Generator().manual_seed(seed)
        device = self.centroids.device
        init_size = init_size or self._init_sample_size()
        sample, frames = reservoir_sample((self._check(b) for b in batches(0)), init_size, rng)
        if frames == 0:
            raise ValueError("KMeans.fit_streaming got no data points")
        sample = sample.to(device)
        self.centroids.copy_(kmeans_plus_plus(sample, self.k, generator))
        reads, reassigned, lloyd_done = 1, 0, 0
        if frames > self.k:
            counts = torch.zeros(self.k, device=device)
            for epoch in range(minibatch_passes):
                chosen = torch.zeros(self.k, dtype=torch.bool, device=device)
                for batch in batches(1 + epoch):
                    batch = self._check(batch)
                    before = counts.clone()
                    self._minibatch_update(batch, counts)
                    chosen |= counts > before
                reads += 1
                reassigned += self._reseed(~chosen, sample, rng)
                counts[~chosen] = 0  # a reseeded centroid learns at the full rate again
            previous = None
            for epoch in range(lloyd_passes):
                sums = torch.zeros_like(self.centroids)  # [k, D]
                sizes = torch.zeros(self.k, device=device)  # [k]
                inertia = 0.0
                for batch in batches(1 + minibatch_passes + epoch):
                    batch = self._check(batch)
                    assign, dist = nearest(batch, self.centroids)
                    sums.index_add_(0, assign, batch)
                    sizes += torch.bincount(assign, minlength=self.k).to(sizes.dtype)
                    inertia += float(dist.double().sum())
                reads += 1
                lloyd_done += 1
                empty = sizes == 0
                self.centroids[~empty] = sums[~empty] / sizes[~empty, None]
                reassigned += self._reseed(empty, sample, rng)
                if previous is not None and previous - inertia <= tol * max(previous, 1e-12):
                    break
                previous = inertia
        self.fitted.fill_(True)
        inertia, sizes = 0.0, torch.zeros(self.k, device=device)
        for batch in batches(1 + minibatch_passes + lloyd_done):
            assign, dist = nearest(self._check(batch), self.centroids)
            sizes += torch.bincount(assign, minlength=self.k).to(sizes.dtype)
            inertia += float(dist.double().sum())
        reads += 1
        return StreamingFitStats(
            frames=frames,
            init_sample=int(sample.shape[0]),
            minibatch_passes=minibatch_passes if frames > self.k else 0,
            lloyd_passes=lloyd_done,
            reads=reads,
            inertia=inertia,
            inertia_per_frame=inertia / frames,
            empty_clusters=int((sizes == 0).sum()),
            reassigned=reassigned,
        )

    def _reseed(self, which: Tensor, sample: Tensor, rng: np.random.Generator) -> int:
        """Move the centroids ``which`` (bool ``[k]``) to sample points drawn with probability
        proportional to their squared distance from the other centroids. Returns how many moved."""
        n = int(which.sum())
        if n == 0:
            return 0
        _, dist = nearest(sample, self.centroids[~which]) if bool((~which).any()) else (None, torch.ones(len(sample)))
        weights = dist.double().cpu().numpy()
        total = weights.sum()
        if not np.isfinite(total) or total <= 0:
            return 0  # every sample point already has a centroid: nothing better to move to
        picks = rng.choice(len(sample), size=n, replace=n > int((weights > 0).sum()), p=weights / total)
        self.centroids[which] = sample[torch.from_numpy(picks).to(sample.device)]
        return n

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
