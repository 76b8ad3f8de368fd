import pytest
import torch

from musiclm.tokenizers.kmeans import KMeans

torch.set_num_threads(1)


def blobs(k=6, dim=8, per=150, spread=0.05, seed=0):
    """Well-separated Gaussian clusters: centres ~10 apart, noise 0.05."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 10
    x = centres[:, None, :] + spread * torch.randn(k, per, dim, generator=g)  # [k, per, D]
    labels = torch.arange(k).repeat_interleave(per)
    return centres, x.reshape(-1, dim), labels


def matched_error(centroids, centres):
    """Largest distance from a true centre to its nearest fitted centroid."""
    return torch.cdist(centres, centroids).min(dim=1).values.max().item()


def test_full_batch_recovers_known_clusters():
    centres, x, labels = blobs()
    km = KMeans(6, 8).fit(x, iters=20, seed=0)
    assert bool(km.fitted)
    assert matched_error(km.centroids, centres) < 0.05
    codes = km.assign(x)
    assert codes.dtype == torch.long and codes.shape == (x.shape[0],)
    # every true cluster maps to exactly one centroid and vice versa
    pairs = set(zip(labels.tolist(), codes.tolist()))
    assert len(pairs) == 6 and len({c for _, c in pairs}) == 6
    assert km.inertia(x) == pytest.approx(((x - km.centroids[codes]) ** 2).sum().item(), rel=1e-3)  # float32 expansion of |x - c|^2


def test_minibatch_stream_agrees_with_full_batch():
    centres, x, _ = blobs()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    x = x[perm]
    full = KMeans(6, 8).fit(x, seed=0)
    batches = [x[i : i + 64] for i in range(0, x.shape[0], 64)]
    stream = KMeans(6, 8).fit(batches, iters=3, seed=0)
    one_pass = KMeans(6, 8).fit(iter(batches), seed=0)  # a generator: a single pass
    for km in (stream, one_pass):
        assert matched_error(km.centroids, centres) < 0.1
        assert torch.equal(km.assign(x), km.assign(x))
    # same partition as the full-batch fit (labels may be permuted)
    a, b = full.assign(x), stream.assign(x)
    assert len(set(zip(a.tolist(), b.tolist()))) == 6
    tensor_minibatch = KMeans(6, 8).fit(x, iters=3, seed=0, batch_size=100)
    assert matched_error(tensor_minibatch.centroids, centres) < 0.1


def test_deterministic_for_seed():
    _, x, _ = blobs(k=4, spread=2.0)
    a = KMeans(10, 8).fit(x, seed=3).centroids
    b = KMeans(10, 8).fit(x, seed=3).centroids
    assert torch.equal(a, b)


def test_fewer_points_than_centroids():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    km = KMeans(32, 4).fit(x, seed=0)
    assert torch.isfinite(km.centroids).all()
    assert km.assign(x).unique().numel() == 5
    assert km.inertia(x) < 1e-4  # every point has its own centroid (or a 1e-3-jittered copy of it)
    # surplus centroids sit next to data points
    assert torch.cdist(km.centroids, x).min(dim=1).values.max() < 0.05


def test_assign_keeps_leading_shape_and_chunks():
    _, x, _ = blobs(k=3, dim=4, per=50)
    km = KMeans(3, 4).fit(x)
    codes = km.assign(x.reshape(3, 50, 4))
    assert codes.shape == (3, 50)
    assert torch.equal(codes.reshape(-1), km.assign(x))


def test_errors():
    km = KMeans(3, 4)
    with pytest.raises(RuntimeError, match="not fitted"):
        km.assign(torch.randn(2, 4))
    with pytest.raises(ValueError):
        km.fit(torch.randn(10, 5))
    with pytest.raises(ValueError):
        km.fit(torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError):
        km.fit([])


def test_state_dict_round_trip():
    _, x, _ = blobs(k=3, dim=4, per=20)
    km = KMeans(3, 4).fit(x)
    other = KMeans(3, 4)
    other.load_state_dict(km.state_dict())
    assert bool(other.fitted)
    assert torch.equal(other.assign(x), km.assign(x))


def test_reservoir_sample_is_uniform_and_bounded():
    import numpy as np

    from musiclm.tokenizers.kmeans import reservoir_sample

    data = torch.arange(1000, dtype=torch.float32)[:, None]  # row i holds i
    batches = [data[i : i + 37] for i in range(0, 1000, 37)]  # uneven batches
    hits = torch.zeros(1000)
    for seed in range(100):
        sample, seen = reservoir_sample(batches, 100, np.random.default_rng(seed))
        assert seen == 1000 and sample.shape == (100, 1)
        rows = sample[:, 0].long()
        assert rows.unique().numel() == 100  # distinct rows of the data, no duplicates
        hits[rows] += 1
    # every row is kept with probability 100 / 1000: 10 of 100 draws (mean of 100 rows: sd 0.3); first and
    # last tenth alike, where a "keep the first rows" or "keep the last rows" bug would give 100 or 0
    assert abs(hits[:100].mean().item() - 10) < 1.5 and abs(hits[-100:].mean().item() - 10) < 1.5
    short, seen = reservoir_sample([data[:30]], 100, np.random.default_rng(0))
    assert seen == 30 and torch.equal(short, data[:30])


def test_streaming_fit_agrees_with_full_batch_lloyd():
    centres, x, _ = blobs(k=6, per=400)
    x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(2))]
    calls = []

    def batches(epoch):
        calls.append(epoch)
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(epoch))
        return (x[order[i : i + 128]] for i in range(0, x.shape[0], 128))  # a one-shot stream per pass

    full = KMeans(6, 8).fit(x, seed=0)
    stream = KMeans(6, 8)
    stats = stream.fit_streaming(batches, minibatch_passes=2, lloyd_passes=3, seed=0)
    assert matched_error(stream.centroids, centres) < 0.02
    assert len(set(zip(full.assign(x).tolist(), stream.assign(x).tolist()))) == 6  # the same partition

    def exact_inertia(km):  # |x - c|^2 directly: the chunked |x|^2 - 2xc + |c|^2 loses digits for far-off blobs
        return ((x - km.centroids[km.assign(x)]) ** 2).sum().item()

    assert exact_inertia(stream) == pytest.approx(exact_inertia(full), rel=1e-4)
    assert stats.inertia == pytest.approx(exact_inertia(stream), rel=1e-2)
    assert stats.frames == x.shape[0] and stats.empty_clusters == 0
    # reservoir pass + 2 mini-batch passes + up to 3 Lloyd passes + the inertia pass, each a fresh read
    assert stats.reads == len(calls) == 1 + 2 + stats.lloyd_passes + 1 and 1 <= stats.lloyd_passes <= 3
    again = KMeans(6, 8)
    again.fit_streaming(batches, minibatch_passes=2, lloyd_passes=3, seed=0)
    assert torch.equal(again.centroids, stream.centroids)  # deterministic for a seed


def test_streaming_fit_reseeds_dead_centroids():
    # 3 tight clusters and 12 centroids: mini-batch k-means leaves centroids that no row picks;
    # they are moved onto data, so every centroid ends up used
    _, x, _ = blobs(k=3, per=300, spread=1.0)
    km = KMeans(12, 8)
    stats = km.fit_streaming(lambda e: [x[i : i + 100] for i in range(0, x.shape[0], 100)], seed=0)
    assert stats.empty_clusters == 0
    assert km.assign(x).unique().numel() == 12
    tiny = KMeans(64, 8)
    tiny_stats = tiny.fit_streaming(lambda e: [x[:20]], seed=0)  # fewer rows than centroids
    assert tiny_stats.frames == 20 and tiny_stats.inertia < 1e-3
    with pytest.raises(ValueError, match="no data"):
        KMeans(4, 8).fit_streaming(lambda e: [], seed=0)
