"""Stage training throughput: the learner alone in this process vs the same steps through the runner.

    .venv/bin/python benchmarks/bench_training.py --stage semantic --steps 40

Writes synthetic 10-s token shards (random codes: throughput does not depend on what is learnt),
then measures target tokens/s of the ``tiny`` preset

* in-process: ``StageLearner.collate`` + ``train_step`` in a plain loop (no shards, no Ray),
  measured before and after the runner (the faster counts: other load on the machine drifts),
* runner, steady state: the runner's own ``tokens_per_s`` rows (shard reading, the prefetch
  thread, metrics and checkpoints included; the first logging window, which holds warm-up, skipped),
* runner, end to end: all steps over the wall time of ``train()`` (Ray start, worker start-up,
  model build, checkpoints and eval included) — the fixed cost that Ray Train adds to a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from musiclm.constants import (  # noqa: E402
    ACOUSTIC_CODEBOOK_SIZE,
    ACOUSTIC_CODEBOOKS,
    MULAN_CODEBOOK_SIZE,
    MULAN_CODEBOOKS,
)
from musiclm.data.shards import iter_samples, write_shard  # noqa: E402


def write_token_shards(folder: Path, *, shards: int = 4, per_shard: int = 16, seconds: float = 10.0, seed: int = 0) -> Path:
    """Random token samples shaped like the tokenizer's output for ``seconds``-long windows."""
    rng = np.random.default_rng(seed)
    frames = int(seconds * 50)  # acoustic frames at 50 Hz; semantic frames at 25 Hz
    for s in range(shards):
        samples = [
            {
                "__key__": f"bench{s}_{i:04d}",
                "json": {"source": "synthetic", "start": 0.0, "end": seconds, "caption": "noise"},
                "acoustic": rng.integers(0, ACOUSTIC_CODEBOOK_SIZE, (frames, ACOUSTIC_CODEBOOKS)).astype(np.int16),
                "semantic": rng.integers(0, 1024, frames // 2).astype(np.int16),
                "mulan": rng.integers(0, MULAN_CODEBOOK_SIZE, MULAN_CODEBOOKS).astype(np.int16),
            }
            for i in range(per_shard)
        ]
        write_shard(folder / f"tokens-{s:06d}.tar", samples)
    return folder


def bench_in_process(stage: str, data: Path, steps: int, threads: int) -> dict[str, float]:
    """Tokens/s of the bare learner loop (samples decoded up front, so only collate + step are timed)."""
    from musiclm.training.stage_learner import StageLearner

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    learner = StageLearner("tiny", torch.device("cpu"), stage=stage)
    samples = list(iter_samples(data, split_by_node=False, split_by_worker=False))
    batch_size = learner.batch_size
    learner.train_step(learner.collate(samples[:batch_size]))  # warm-up
    tokens, start = 0.0, time.perf_counter()
    for step in range(steps):
        first = step * batch_size % len(samples)
        group = (samples * 2)[first : first + batch_size]
        tokens += learner.train_step(learner.collate(group))["tokens"]
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": tokens / elapsed, "step_s": elapsed / steps, "batch_size": batch_size}


def bench_runner(stage: str, data: Path, out: Path, steps: int, workers: int, log_every: int) -> dict[str, float]:
    from musiclm.training.metrics import read_metrics
    from musiclm.training.runner import train

    start = time.perf_counter()
    result = train(stage, data, out, workers=workers, max_steps=steps, log_every=log_every, eval_batches=1)
    wall = time.perf_counter() - start
    rows = read_metrics(out)
    steady = [r["tokens_per_s"] for r in rows[1:]] or [rows[-1]["tokens_per_s"]]
    tokens_per_step = statistics.mean(r["tokens_per_s"] * r["step_time_s"] for r in rows)  # all workers
    return {
        "steady_tokens_per_s": statistics.mean(steady),
        "end_to_end_tokens_per_s": tokens_per_step * steps / wall,
        "wall_s": wall,
        "eval": result["eval"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="semantic", choices=["semantic", "coarse", "fine"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers for the runner (0: local mode)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = write_token_shards(Path(tmp) / "tokens", shards=max(4, args.workers))
        # in-process before and after the runner: on a shared machine the load drifts, keep the faster
        before = bench_in_process(args.stage, data, args.steps, args.threads)
        print(f"in-process : {before['tokens_per_s']:9.0f} tokens/s  ({before['step_s'] * 1000:.0f} ms/step)", flush=True)
        ray = bench_runner(args.stage, data, Path(tmp) / "out", args.steps, args.workers, log_every=max(1, args.steps // 4))
        after = bench_in_process(args.stage, data, args.steps, args.threads)
        print(f"in-process : {after['tokens_per_s']:9.0f} tokens/s  ({after['step_s'] * 1000:.0f} ms/step), again", flush=True)
        alone = max(before, after, key=lambda r: r["tokens_per_s"])
    print(f"runner     : {ray['steady_tokens_per_s']:9.0f} tokens/s steady, "
          f"{ray['end_to_end_tokens_per_s']:.0f} tokens/s end to end ({ray['wall_s']:.1f} s wall for {args.steps} steps)")
    print(f"Ray Train overhead: {100 * (1 - ray['steady_tokens_per_s'] / alone['tokens_per_s']):.0f} % in steady state, "
          f"{ray['wall_s'] - args.steps * alone['step_s']:.1f} s fixed per run")
    if args.json:
        Path(args.json).write_text(json.dumps({"stage": args.stage, "steps": args.steps, "workers": args.workers,
                                               "in_process": [before, after], "runner": ray}, indent=2, default=float))


if __name__ == "__main__":
    main()
