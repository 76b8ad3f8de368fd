"""Long generation on CPU: the windowed plan (``Cascade.generate_spec``) against the old batched path.

    python benchmarks/bench_long_generation.py                  # 10 s and 60 s, both paths
    python benchmarks/bench_long_generation.py --seconds 300    # the 5-minute check: 60 s vs 300 s, windowed

Random-weight ``tiny`` stages (dim 256, 4 layers, 4 heads, FF 1024; crops 10/2/1 s) and a random tiny
SoundStream: the cost of generation does not depend on the weights. The windowed path generates a
two-segment story ("calm piano" then "energetic techno", half the duration each) window by window
and streams the audio; the batched path (``Cascade.generate``: ``generate_semantic`` /
``generate_coarse`` / ``generate_fine``) decodes all acoustic windows of the piece as one batch and
holds every token until the end, so its memory grows with the duration.

Each (path, duration) runs in a fresh process, so its peak RSS is its own (the peak is reset after the
models are built and warmed up: the number is what generating costs on top of holding the models).
Printed per run: wall and CPU seconds, the real-time factor (seconds per second of audio; < 1 is
faster than real time) by wall and by CPU time (the CPU one is the fairer on a shared machine), time
to first audio, peak RSS, and milliseconds per generated token of each stage. A duration over 60 s
also runs the windowed 60 s, to compare the peak RSS of the two: memory is bounded by one window.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

STAGES = ("semantic", "coarse", "fine")
STORY = ("calm piano", "energetic techno")


class CrcConditioner:
    """A stand-in for MuLan's text tokens: 12 codes per prompt from its CRC (the same in every process)."""

    def tokens_text(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([[(zlib.crc32(p.encode()) >> q) % 1024 for q in range(12)] for p in prompts])


def tiny_cascade():
    """The cascade of random tiny stages and a random tiny (causal) SoundStream."""
    from musiclm.generation.cascade import Cascade, Stage
    from musiclm.models.stages import StageConfig
    from musiclm.models.transformer import StageTransformer
    from musiclm.tokenizers.soundstream import SoundStream, SoundStreamConfig

    stages = []
    for seed, name in enumerate(STAGES):
        cfg = StageConfig.preset(name, "tiny")
        cfg = dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, dropout=0.0))
        torch.manual_seed(seed)
        stages.append(Stage(StageTransformer(cfg.transformer).eval(), cfg))
    torch.manual_seed(0)
    return Cascade(*stages, CrcConditioner(), SoundStream(SoundStreamConfig.preset("tiny")).eval())


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Clock:
    """Wall and process-CPU seconds (all threads) accumulated per key."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def timed(self, key: str, fn, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        self.wall[key] += time.perf_counter() - wall
        self.cpu[key] += time.process_time() - cpu
        return out


def run_windowed(cascade, seconds: float, seed: int) -> dict:
    """The story through ``plan_steps`` with the cascade's executor, timing each stage's calls."""
    from musiclm.generation.plan import drive, plan_steps
    from musiclm.generation.spec import GenerationSpec, Segment

    spec = GenerationSpec(segments=[Segment(p, seconds / len(STORY)) for p in STORY], seed=seed)
    execute, clock, tokens = cascade.executor(), Clock(), defaultdict(int)

    def timed_execute(call):
        out = clock.timed(call.kind, execute, call)
        if call.kind in STAGES:
            tokens[call.kind] += int(np.asarray(out).size)
        return out

    start, first, samples = time.perf_counter(), None, 0
    for chunk in drive(plan_steps(spec, cascade.configs), timed_execute):
        first = time.perf_counter() - start if first is None else first
        samples += chunk.shape[-1]
    return {"clock": clock, "tokens": dict(tokens), "first_audio_s": first, "samples": samples}


def run_batched(cascade, seconds: float, seed: int) -> dict:
    """``Cascade.generate`` split into its stage functions (the same calls, timed one by one)."""
    from musiclm.generation.cascade import generate_coarse, generate_fine, generate_semantic, stage_generator

    clock = Clock()
    with torch.inference_mode():
        mulan = clock.timed("condition", cascade.conditioner.tokens_text, [STORY[0]])
    s, c, f = cascade.semantic, cascade.coarse, cascade.fine
    semantic = clock.timed("semantic", generate_semantic, s.model, s.config, mulan, seconds, s.config.temperature,
                           stage_generator(seed, "semantic"))
    coarse = clock.timed("coarse", generate_coarse, c.model, c.config, mulan, semantic, c.config.temperature,
                         stage_generator(seed, "coarse"))
    acoustic = clock.timed("fine", generate_fine, f.model, f.config, mulan, coarse, f.config.temperature,
                           stage_generator(seed, "fine"))
    wav = clock.timed("decode", cascade.decode, acoustic)
    tokens = {"semantic": semantic.numel(), "coarse": coarse.numel(), "fine": acoustic.numel() - coarse.numel()}
    total = sum(clock.wall.values())
    return {"clock": clock, "tokens": tokens, "first_audio_s": total, "samples": len(wav)}


def worker(path: str, seconds: float, threads: int, seed: int) -> dict:
    """One measured run in this process: build, warm up, reset the peak RSS, generate."""
    torch.set_num_threads(threads)
    cascade = tiny_cascade()
    run = run_windowed if path == "windowed" else run_batched
    run(cascade, 2.0, seed + 1)  # warm-up: allocator, kernels, first-call costs
    resident = peak_rss_mb()
    reset = reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    result = run(cascade, seconds, seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    audio = result["samples"] / 24000
    clock = result["clock"]
    return {
        "path": path, "seconds": seconds, "audio_s": audio, "threads": threads, "wall_s": wall, "cpu_s": cpu,
        "rtf_wall": wall / audio, "rtf_cpu": cpu / audio, "first_audio_s": result["first_audio_s"],
        "peak_rss_mb": peak_rss_mb(), "models_rss_mb": resident, "peak_reset": reset,
        "tokens": result["tokens"],
        "ms_per_token_cpu": {k: 1e3 * clock.cpu[k] / n for k, n in result["tokens"].items()},
        "ms_per_token_wall": {k: 1e3 * clock.wall[k] / n for k, n in result["tokens"].items()},
        "decode_s": clock.wall.get("decode", 0.0),
    }


def print_table(rows: list[dict]) -> None:
    head = (f"{'path':<9} {'audio':>6} {'wall':>7} {'CPU':>7} {'RTF':>5} {'RTF':>5} {'first':>6} {'peak':>6}"
            f"  {'ms/token CPU (wall)':^44}")
    print(head)
    print(f"{'':<9} {'s':>6} {'s':>7} {'s':>7} {'wall':>5} {'CPU':>5} {'audio':>6} {'RSS':>6}"
          f"  {'semantic':>14} {'coarse':>14} {'fine':>14}")
    for r in rows:
        stages = " ".join(
            f"{r['ms_per_token_cpu'][s]:6.2f} ({r['ms_per_token_wall'][s]:5.2f})" for s in STAGES
        )
        print(f"{r['path']:<9} {r['audio_s']:6.1f} {r['wall_s']:7.1f} {r['cpu_s']:7.1f} {r['rtf_wall']:5.2f} "
              f"{r['rtf_cpu']:5.2f} {r['first_audio_s']:5.1f}s {r['peak_rss_mb'] - r['models_rss_mb']:+5.0f}M"
              f"  {stages}")
    print("first audio: seconds to the first streamed chunk (batched: the whole piece); peak RSS: growth over the "
          "warmed-up process holding the models")
    for r in rows:
        print(f"  {r['path']} {r['seconds']:g} s: tokens {r['tokens']}, process peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(models + warm-up {r['models_rss_mb']:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0, 60.0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batched-max-seconds", type=float, default=60.0,
                        help="run the old batched path only up to this duration (its memory grows with it)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, seconds = args.worker.split(":")
        print(json.dumps(worker(path, float(seconds), args.threads, args.seed)))
        return
    if min(args.seconds) <= 0:
        parser.error("--seconds must be > 0")
    if max(args.seconds) > 60 and 60 not in args.seconds:
        args.seconds = [60.0, *args.seconds]  # the memory comparison: 60 s against the longer piece
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} torch thread(s), "
          f"load average {os.getloadavg()[0]:.1f}; random tiny stages + tiny SoundStream")
    rows = []
    for seconds in args.seconds:
        paths = ["windowed"] + (["batched"] if seconds <= args.batched_max_seconds else [])
        for path in paths:
            cmd = [sys.executable, __file__, "--worker", f"{path}:{seconds}", "--threads", str(args.threads),
                   "--seed", str(args.seed)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{path} {seconds:g} s failed:\n{done.stderr}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  done: {path} {seconds:g} s in {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU", flush=True)
    print_table(rows)
    windowed = [r for r in rows if r["path"] == "windowed"]
    if len(windowed) > 1:
        print("windowed peak RSS growth by duration (bounded by one window, not by the duration): " + ", ".join(
            f"{r['seconds']:g} s {r['peak_rss_mb'] - r['models_rss_mb']:+.0f} MB" for r in windowed))


if __name__ == "__main__":
    main()
