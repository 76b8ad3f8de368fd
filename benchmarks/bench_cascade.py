"""Real-time factor of the whole cascade (text → 24-kHz audio), stage by stage.

    python benchmarks/bench_cascade.py --checkpoints musiclm-demo/checkpoints --seconds 10

Prints the wall time of each part (MuLan text tokens, semantic, coarse, fine, SoundStream decode)
and the real-time factor (wall seconds per audio second; < 1 is faster than real time).
"""

from __future__ import annotations

import argparse
import time

import torch

from musiclm.constants import SAMPLING_TEMPERATURES
from musiclm.generation.cascade import Cascade, generate_coarse, generate_fine, generate_semantic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", default="musiclm-demo/checkpoints")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--prompt", default="an upbeat techno track with a pulsing synth bass")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cascade = Cascade.load(args.checkpoints)
    cascade.generate(args.prompt, seconds=2.0, seed=0)  # warm-up: allocator, first-call costs
    rows = []
    for repeat in range(args.repeats):
        gen = torch.Generator().manual_seed(repeat)
        t = {}
        start = time.perf_counter()
        with torch.inference_mode():
            mulan = cascade.conditioner.tokens_text([args.prompt])
        t["mulan text → M_T"] = time.perf_counter() - start
        mark = time.perf_counter()
        semantic = generate_semantic(cascade.semantic.model, cascade.semantic.config, mulan, args.seconds,
                                     SAMPLING_TEMPERATURES["semantic"], gen)
        t["semantic stage"] = time.perf_counter() - mark
        mark = time.perf_counter()
        coarse = generate_coarse(cascade.coarse.model, cascade.coarse.config, mulan, semantic,
                                 SAMPLING_TEMPERATURES["coarse"], gen)
        t["coarse stage"] = time.perf_counter() - mark
        mark = time.perf_counter()
        acoustic = generate_fine(cascade.fine.model, cascade.fine.config, mulan, coarse, SAMPLING_TEMPERATURES["fine"], gen)
        t["fine stage"] = time.perf_counter() - mark
        mark = time.perf_counter()
        wav = cascade.decode(acoustic)
        t["soundstream decode"] = time.perf_counter() - mark
        t["total"] = time.perf_counter() - start
        tokens = {"semantic": semantic.numel(), "coarse": coarse.numel(), "fine": acoustic.numel() - coarse.numel()}
        rows.append((t, tokens, len(wav) / 24000))

    print(f"cascade on {args.seconds:g} s of audio, {torch.get_num_threads()} torch threads, {args.repeats} runs")
    print(f"{'part':<22}" + "".join(f"{'run ' + str(i):>12}" for i in range(len(rows))))
    for key in rows[0][0]:
        print(f"{key:<22}" + "".join(f"{r[0][key]:>11.2f}s" for r in rows))
    for stage in ("semantic", "coarse", "fine"):
        rates = [r[1][stage] / r[0][f"{stage} stage"] for r in rows]
        print(f"{stage + ' tokens/s':<22}" + "".join(f"{x:>12.0f}" for x in rates))
    rtf = [r[0]["total"] / r[2] for r in rows]
    print(f"{'real-time factor':<22}" + "".join(f"{x:>12.3f}" for x in rtf))
    print(f"best: {min(r[0]['total'] for r in rows):.2f} s wall for {rows[0][2]:.1f} s of audio "
          f"(target: under {args.seconds:g} s)")


if __name__ == "__main__":
    main()
