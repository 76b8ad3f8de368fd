"""An acoustic stage started from the codec's code vectors vs from a random init, side by side.

    python benchmarks/bench_code_init.py --workdir musiclm-demo                 # after `musiclm demo`
    python benchmarks/bench_code_init.py --workdir musiclm-demo --stage fine --steps 150
    python benchmarks/bench_code_init.py --workdir musiclm-demo --export /tmp/code-init

Trains the ``tiny`` stage (the demo's options: melody tokens, and the contour for the coarse stage)
twice on the demo's token shards, in this process, with the same seed, batches and steps: once from
``StageTransformer``'s random init, once with ``codec_init`` (:mod:`musiclm.training.code_embeddings`).
Every ``--every`` steps both are scored on the same held-out batches: cross-entropy (nats/token) with
their conditioning, without the melody (tokens and contour), and the unigram baseline.

``--export DIR`` writes, per run, ``DIR/<run>/checkpoints`` (the demo's, with this stage replaced) and
links the demo's token shards beside it, so ``bench_melody_path.py --workdir DIR/<run>`` measures
what each does to melody adherence.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

RUNS = ("random", "codec")


def load(folder: Path) -> list[dict]:
    from musiclm.data.shards import iter_samples

    return list(iter_samples(str(folder), split_by_node=False, split_by_worker=False))


def learner(work: Path, stage: str, run: str, steps: int, batch_size: int, seed: int):
    from musiclm.training.stage_learner import StageLearner

    recorded = json.loads((work / "checkpoints" / stage / "config.json").read_text())  # the demo's rates and tokenizers
    return StageLearner("tiny", stage=stage, batch_size=batch_size, max_steps=steps, seed=seed,
                        rates=recorded["config"]["rates"], token_info=recorded["meta"]["token_info"],
                        melody=True, contour=stage == "coarse",
                        codec_init=str(work / "checkpoints") if run == "codec" else None)


def score(learner, heldout: list[dict], batches: int) -> dict[str, float]:
    """Mean held-out metrics over the same ``batches`` crops for every call (fixed crop and dropout rngs)."""
    picks, rng = np.random.default_rng(1), learner.rng
    learner.rng = np.random.default_rng(5)
    rows = [learner.eval_step(learner.collate([heldout[i] for i in picks.integers(0, len(heldout), learner.batch_size)]))
            for _ in range(batches)]
    learner.rng = rng
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def export(work: Path, stage: str, learner, out: Path) -> None:
    ckpt = out / "checkpoints"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    shutil.copytree(work / "checkpoints", ckpt, ignore=shutil.ignore_patterns("training_state"))
    shutil.rmtree(ckpt / stage)
    learner.export(str(ckpt / stage))
    (out / "shards").mkdir(exist_ok=True)
    for name in ("tokens", "heldout-tokens"):
        link = out / "shards" / name
        if not link.exists():
            link.symlink_to((work / "shards" / name).resolve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="musiclm-demo", help="a `musiclm demo` working folder")
    parser.add_argument("--stage", choices=["coarse", "fine"], default="coarse")
    parser.add_argument("--steps", type=int, default=300, help="the demo's coarse steps")
    parser.add_argument("--batch-size", type=int, default=4, help="the demo's coarse batch")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--export", help="write each run's checkpoints here (for bench_melody_path.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    train, heldout = load(work / "shards" / "tokens"), load(work / "shards" / "heldout-tokens")
    print(f"{args.stage} stage, {args.steps} steps of {args.batch_size} crops, {len(train)} training and "
          f"{len(heldout)} held-out clips of {work}", flush=True)
    curves: dict[str, list[dict]] = {}
    for run in RUNS:
        torch.manual_seed(args.seed)
        stage = learner(work, args.stage, run, args.steps, args.batch_size, args.seed)
        picks, start = np.random.default_rng(args.seed), time.perf_counter()
        for step in range(1, args.steps + 1):
            stage.train_step(stage.collate([train[i] for i in picks.integers(0, len(train), stage.batch_size)]))
            if step % args.every == 0 or step == args.steps:
                row = {"step": step, **score(stage, heldout, args.eval_batches)}
                curves.setdefault(run, []).append(row)
                print(f"  {run:>6} step {step:4d}: held-out CE {row['ce']:.3f}, without melody "
                      f"{row['ce_without_melody']:.3f}, unigram {row['unigram_ce']:.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
        if args.export:
            export(work, args.stage, stage, Path(args.export) / run)
    print(f"\nheld-out cross-entropy of the {args.stage} stage (nats/token; unigram {curves['random'][-1]['unigram_ce']:.3f})")
    print("step | random init | codec init | codec init, without melody")
    for a, b in zip(curves["random"], curves["codec"]):
        print(f"{a['step']} | {a['ce']:.3f} | {b['ce']:.3f} | {b['ce_without_melody']:.3f}")
    print(json.dumps({"stage": args.stage, "steps": args.steps, "curves": curves}))


if __name__ == "__main__":
    main()
