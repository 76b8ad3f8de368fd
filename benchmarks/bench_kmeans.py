"""Corpus-scale semantic k-means: streaming fit from feature chunks on disk, 100k vs 1M frames.

    .venv/bin/python benchmarks/bench_kmeans.py [--dim 256] [--k 1024] [--sizes 100000 1000000]

Writes random-but-clustered features (Gaussian blobs around 2k centres) as float16 chunks in the layout
the Beam job ``musiclm.pipelines.sample_features`` writes, generated chunk by chunk. Each fit runs in its
own subprocess, which reports its peak RSS (``ru_maxrss``) and wall time; a subprocess that only imports
the same modules gives the baseline RSS. Quality: the inertia per frame on the first ``--subset`` frames,
for the streaming fits and for full-batch Lloyd fitted in memory on exactly that subset.
The paper's w2v-BERT features are 1024-d (``--dim 1024``); the default 256 keeps the run short on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_sample(folder: Path, frames: int, dim: int, chunk: int, seed: int = 0) -> None:
    from musiclm.pipelines.sample_features import FEATURES_PREFIX, write_feature_manifest

    folder.mkdir(parents=True, exist_ok=True)
    centres = np.random.default_rng(1234).normal(size=(2048, dim)).astype(np.float32) * 2.0
    rng = np.random.default_rng(seed)
    entries = []
    for i, start in enumerate(range(0, frames, chunk)):
        n = min(chunk, frames - start)
        x = centres[rng.integers(len(centres), size=n)] + rng.normal(scale=0.5, size=(n, dim)).astype(np.float32)
        name = f"{FEATURES_PREFIX}-{i:06d}.npy"
        np.save(folder / name, x.astype(np.float16))
        entries.append({"name": name, "frames": n, "windows": n // 25, "dim": dim, "dtype": "float16", "sha256": "",
                        "bytes": (folder / name).stat().st_size})
    write_feature_manifest(str(folder), entries, {"feature_model": {"backend": "synthetic"}, "keep_fraction": 1.0})


def subset(folder: Path, frames: int):
    """The first ``frames`` rows of a sample (chunk order), as one float32 tensor."""
    import torch

    from musiclm.pipelines.sample_features import load_chunk, read_feature_manifest

    parts, have = [], 0
    for entry in read_feature_manifest(str(folder))["shards"]:
        part = np.asarray(load_chunk(str(folder / entry["name"]))[: frames - have], dtype=np.float32)
        parts.append(part)
        have += len(part)
        if have >= frames:
            break
    return torch.from_numpy(np.concatenate(parts))


def inertia_per_frame(centroids, x) -> float:
    from musiclm.tokenizers.kmeans import nearest

    return float(nearest(x, centroids)[1].double().sum()) / x.shape[0]


def child(args: argparse.Namespace) -> None:
    import torch

    import musiclm.pipelines.sample_features  # noqa: F401  imported before the clock starts
    from musiclm.tokenizers.kmeans import KMeans
    from musiclm.training.fitting import fit_semantic_kmeans_on_features

    result: dict = {}
    start = time.perf_counter()
    if args.child == "stream":
        kmeans, meta = fit_semantic_kmeans_on_features(
            args.folder, None, preset="bench", k=args.k, minibatch_passes=args.minibatch_passes,
            lloyd_passes=args.lloyd_passes, batch_size=args.batch_size)
        result.update(seconds=time.perf_counter() - start, reads=meta["reads"], frames=meta["frames"],
                      inertia_per_frame=meta["inertia_per_frame"], empty=meta["empty_clusters"])
        torch.save(kmeans.centroids, Path(args.folder) / "centroids.pt")
    elif args.child == "lloyd":
        x = subset(Path(args.folder), args.subset)
        kmeans = KMeans(args.k, x.shape[1]).fit(x, iters=args.lloyd_iters, seed=0)
        result.update(seconds=time.perf_counter() - start, frames=x.shape[0],
                      inertia_per_frame=inertia_per_frame(kmeans.centroids, x))
    # "baseline": the same imports as a fit, nothing else
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def run_child(kind: str, folder: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--folder", str(folder), "--k", str(args.k),
           "--subset", str(args.subset), "--lloyd-iters", str(args.lloyd_iters), "--batch-size", str(args.batch_size),
           "--minibatch-passes", str(args.minibatch_passes), "--lloyd-passes", str(args.lloyd_passes)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--chunk", type=int, default=65_536, help="frames per chunk file (the job's chunk_frames)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--minibatch-passes", type=int, default=2)
    parser.add_argument("--lloyd-passes", type=int, default=3)
    parser.add_argument("--subset", type=int, default=100_000, help="frames for the in-memory Lloyd reference")
    parser.add_argument("--lloyd-iters", type=int, default=10)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-kmeans-"))
    print(f"dim {args.dim}, k {args.k}, chunks of {args.chunk} frames (float16), batches of {args.batch_size}, "
          f"{args.minibatch_passes} mini-batch + {args.lloyd_passes} Lloyd passes; torch threads {torch.get_num_threads()}")
    baseline = run_child("baseline", work, args)["peak_rss_mb"]
    print(f"baseline RSS (imports only): {baseline:.0f} MB")
    rows = []
    for size in args.sizes:
        folder = work / f"frames-{size}"
        if not (folder / "manifest.json").exists():
            t = time.perf_counter()
            write_sample(folder, size, args.dim, args.chunk)
            print(f"wrote {size} frames in {time.perf_counter() - t:.1f} s")
        fit = run_child("stream", folder, args)
        reference = subset(folder, args.subset)
        fit["subset_inertia_per_frame"] = inertia_per_frame(torch.load(folder / "centroids.pt"), reference)
        fit["size"] = size
        fit["all_in_memory_mb"] = size * args.dim * 4 / 2**20
        rows.append(fit)
        print(f"{size:>9} frames: {fit['seconds']:7.1f} s, peak RSS {fit['peak_rss_mb']:6.0f} MB "
              f"(+{fit['peak_rss_mb'] - baseline:.0f} over imports; all frames as float32 would be "
              f"{fit['all_in_memory_mb']:.0f} MB), {fit['reads']} reads, inertia/frame {fit['inertia_per_frame']:.2f}, "
              f"on the subset {fit['subset_inertia_per_frame']:.2f}, {fit['empty']} empty clusters", flush=True)
    lloyd = run_child("lloyd", work / f"frames-{args.sizes[0]}", args)
    print(f"full-batch Lloyd in memory on {lloyd['frames']} frames ({args.lloyd_iters} iterations): "
          f"{lloyd['seconds']:.1f} s, peak RSS {lloyd['peak_rss_mb']:.0f} MB, inertia/frame {lloyd['inertia_per_frame']:.2f}")
    print()
    print(f"{'frames':>9} {'seconds':>8} {'peak RSS MB':>11} {'over imports':>12} {'inertia/frame (subset)':>22} {'vs Lloyd':>8}")
    for r in rows:
        print(f"{r['size']:>9} {r['seconds']:>8.1f} {r['peak_rss_mb']:>11.0f} {r['peak_rss_mb'] - baseline:>12.0f} "
              f"{r['subset_inertia_per_frame']:>22.3f} {r['subset_inertia_per_frame'] / lloyd['inertia_per_frame']:>8.3f}")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"ratio {b['size'] // a['size']}x frames: time x{b['seconds'] / a['seconds']:.2f}, "
              f"peak RSS over imports x{(b['peak_rss_mb'] - baseline) / max(1.0, a['peak_rss_mb'] - baseline):.2f}")


if __name__ == "__main__":
    main()
