"""Peak memory of the Beam jobs against the length of one input file: 1 minute vs 60 minutes.

A corpus may hold hour-long recordings; the jobs stream each file in blocks and emit its crop
windows one by one, so peak memory should hardly grow with the file's length (target: the 60-min
file's peak RSS <= 1.5x the 1-min file's). Each run is a fresh Python process (its own
``ru_maxrss``), tokenizing one file with untrained tiny tokenizers (windows of the tiny preset) or
preparing its audio shards; the inputs are 44.1-kHz stereo FLAC, written block by block so that
the generator itself never holds an hour of audio.

    python benchmarks/bench_memory.py                       # 1 and 60 minutes, both jobs
    python benchmarks/bench_memory.py --long-minutes 20 --jobs tokenize --work /tmp/benchmem
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCK_SECONDS = 10


def write_test_file(path: Path, minutes: float, rate: int = 44100, channels: int = 2, seed: int = 0) -> Path:
    """A deterministic FLAC of ``minutes`` of drifting tones + noise, written 10 s at a time."""
    import soundfile as sf

    if path.exists():
        info = sf.info(str(path))
        if (info.samplerate, info.channels, info.frames) == (rate, channels, int(minutes * 60 * rate)):
            return path  # reuse a file from an earlier run in the same --work folder
    total = int(minutes * 60 * rate)
    tmp = path.with_suffix(".part.flac")
    with sf.SoundFile(str(tmp), "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as f:
        for first in range(0, total, BLOCK_SECONDS * rate):
            n = min(BLOCK_SECONDS * rate, total - first)
            rng = np.random.default_rng([seed, first])
            t = (first + np.arange(n)) / rate
            freqs = rng.uniform(110, 880, size=channels)
            block = np.stack([0.25 * np.sin(2 * np.pi * fr * t) for fr in freqs], axis=1)  # [n, C]
            f.write((block + 0.02 * rng.standard_normal((n, channels))).astype(np.float32))
    tmp.rename(path)
    return path


def child(job: str, input_path: str, out_dir: str, ckpt_dir: str) -> None:
    """Run one job on one file in this (fresh) process and print its peak RSS and throughput as JSON."""
    start = time.perf_counter()
    if job == "tokenize":
        from musiclm.pipelines.tokenize import run_tokenize

        stats = run_tokenize([input_path], out_dir, ckpt_dir, progress=False)
    else:
        from musiclm.pipelines.prepare_audio import run_prepare_audio

        stats = run_prepare_audio([input_path], out_dir, progress=False)
    wall = time.perf_counter() - start
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"peak_rss_mb": peak_kb / 1024, "wall_seconds": wall, "windows": stats["windows"],
                      "audio_seconds": stats["audio_seconds"], "dead_letters": stats["dead_letters"]}))


def measure(job: str, input_path: Path, out_dir: Path, ckpt_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", job, str(input_path), str(out_dir), str(ckpt_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{job} on {input_path.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        child(*argv[1:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short-minutes", type=float, default=1.0)
    parser.add_argument("--long-minutes", type=float, default=60.0)
    parser.add_argument("--jobs", default="tokenize,prepare", help="comma-separated: tokenize, prepare")
    parser.add_argument("--work", help="folder for the generated files (kept and reused); default: a temporary one")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    if set(jobs) - {"tokenize", "prepare"}:
        parser.error(f"unknown job in --jobs {args.jobs!r}")

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        files = {m: write_test_file(work / f"input-{m:g}min.flac", m) for m in (args.short_minutes, args.long_minutes)}
        print(f"inputs: 44.1 kHz stereo FLAC, {args.short_minutes:g} and {args.long_minutes:g} min "
              f"({os.path.getsize(files[args.long_minutes]) / 2**20:.0f} MiB), ready in {time.perf_counter() - t0:.0f} s",
              flush=True)
        ckpt = work / "tokenizers"
        shutil.rmtree(ckpt, ignore_errors=True)  # made afresh: folders of an older version no longer load
        from musiclm.tokenizers.bundle import save_random_tokenizers

        save_random_tokenizers(ckpt, "tiny", seed=0)
        results: dict[str, dict[str, dict]] = {}
        for job in jobs:
            results[job] = {}
            for minutes, path in files.items():
                out = work / f"out-{job}-{minutes:g}min-{time.time_ns()}"
                results[job][f"{minutes:g}min"] = measure(job, path, out, ckpt)
                shutil.rmtree(out, ignore_errors=True)
                r = results[job][f"{minutes:g}min"]
                print(f"  {job:9} {minutes:5g} min: peak RSS {r['peak_rss_mb']:7.0f} MiB, {r['windows']} windows, "
                      f"{r['wall_seconds']:.1f} s", flush=True)

    short, long = f"{args.short_minutes:g}min", f"{args.long_minutes:g}min"
    print()
    print(f"{'job':10}{'peak ' + short:>14}{'peak ' + long:>14}{'ratio':>8}{'audio s/s ' + long:>20}")
    for job, runs in results.items():
        a, b = runs[short], runs[long]
        ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
        runs["ratio"] = ratio
        speed = b["audio_seconds"] / b["wall_seconds"]
        print(f"{job:10}{a['peak_rss_mb']:>10.0f} MiB{b['peak_rss_mb']:>10.0f} MiB{ratio:>7.2f}x{speed:>20.1f}")
    print("target: peak RSS of the long file <= 1.5x that of the short one")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
