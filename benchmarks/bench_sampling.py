"""Sampling speed of a stage Transformer with and without the KV cache, and tiny-stage training speed.

    python benchmarks/bench_sampling.py [--context 2000] [--new 256] [--threads N]

Decoding model: dim 256, 4 layers, 4 heads, FF 1024 (the tiny preset's sizes) with the coarse
stage's vocabulary (17,410 ids in, 4,096 out) and relative bias; batch 1; a context of
``--context`` tokens whose first 12 are MuLan conditioning tokens. Targets on a 2-core CPU:
>= 700 new tokens/s with the cache and >= 30x faster than recomputing the sequence per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
import torch

from musiclm.generation.sampler import sample, sample_without_cache
from musiclm.models.stages import StageConfig
from musiclm.models.transformer import StageTransformer


def decoding_model(context: int, new: int) -> tuple[StageTransformer, StageConfig]:
    cfg = StageConfig.preset("coarse", "tiny")
    transformer = dataclasses.replace(cfg.transformer, max_seq_len=context + new, dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    return StageTransformer(transformer).eval(), cfg


def context_tokens(cfg: StageConfig, context: int) -> torch.Tensor:
    """12 MuLan ids, then coarse acoustic ids (frame-major levels 0..3) up to ``context`` tokens: [1, context]."""
    layout = cfg.layout
    rng = np.random.default_rng(0)
    mulan = layout.mulan_ids(rng.integers(0, 1024, 12))
    acoustic = layout.acoustic_ids(rng.integers(0, 1024, ((context - 12) // 4 + 1, 4)), (0, 1, 2, 3))
    return torch.from_numpy(np.concatenate([mulan, acoustic[: context - 12]])).long()[None]


def timed(fn, *args, **kwargs) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu, out


@torch.inference_mode()
def bare_decode_rate(model: StageTransformer, prefix: torch.Tensor, new: int) -> float:
    """Decode-only tokens/s of the same blocks with no relative bias and greedy argmax: the floor of the step cost."""
    context = prefix.shape[1]
    model.setup_cache(1, context + new)
    model.prefill(prefix)
    token = prefix[:, -1:]
    start = time.perf_counter()
    for pos in range(context, context + new):
        x = torch.nn.functional.embedding(token, model.embed.weight)  # [1, 1, D]
        for block in model.blocks:
            x = block.step(x, None, pos)
        token = model.head(model.norm(x[:, 0])).argmax(-1, keepdim=True)  # [1, 1]
    elapsed = time.perf_counter() - start
    model.clear_cache()
    return new / elapsed


def bench_decoding(context: int, new: int, recompute_new: int) -> None:
    model, cfg = decoding_model(context, new)
    prefix = context_tokens(cfg, context)
    ranges = cfg.layout.allowed_ranges(new)
    gen = torch.Generator().manual_seed(0)
    sample(model, prefix[:, :64], 16, allowed_range=ranges[:16], generator=gen)  # warm up kernels

    with torch.inference_mode():  # prefill alone, to report decode-only throughput too
        model.setup_cache(1, context + new)
        prefill_s, _, _ = timed(model.prefill, prefix)
        model.clear_cache()
    wall, cpu, out = timed(sample, model, prefix, new, 0.95, allowed_range=ranges, generator=gen)
    assert out.shape == (1, new)
    cached = new / wall
    decode_only = new / max(wall - prefill_s, 1e-9)
    bare = bare_decode_rate(model, prefix, new)
    wall_r, cpu_r, _ = timed(
        sample_without_cache, model, prefix, recompute_new, 0.95, allowed_range=ranges[:recompute_new], generator=gen
    )
    recomputed = recompute_new / wall_r
    print(f"decoding: dim 256, 4 layers, 4 heads, batch 1, context {context} (12 conditioning tokens), "
          f"{model.num_parameters() / 1e6:.2f}M parameters, {torch.get_num_threads()} thread(s)")
    print(f"  {'':28s} {'new tok/s':>10s} {'CPU ms/tok':>11s}")
    print(f"  {'KV cache (incl. prefill)':28s} {cached:10.0f} {cpu / new * 1e3:11.2f}   ({new} tokens, prefill {prefill_s * 1e3:.0f} ms)")
    print(f"  {'KV cache, decode only':28s} {decode_only:10.0f}")
    print(f"  {'reference: no bias, argmax':28s} {bare:10.0f}   (the same blocks without the bias mask or sampling)")
    print(f"  {'full recomputation':28s} {recomputed:10.1f} {cpu_r / recompute_new * 1e3:11.2f}   ({recompute_new} tokens)")
    print(f"  speed-up with the cache: {cached / recomputed:.0f}x (decode only: {decode_only / recomputed:.0f}x)")


def bench_training(steps: int) -> None:
    from musiclm.training.stage_learner import StageLearner

    rng = np.random.default_rng(0)

    def token_sample() -> dict:
        return {"acoustic": rng.integers(0, 1024, (500, 12)).astype(np.int16),
                "semantic": rng.integers(0, 1024, 250).astype(np.int16),
                "mulan": rng.integers(0, 1024, 12).astype(np.int16)}

    print(f"training (tiny preset, default batch sizes, {steps} steps after one warm-up step):")
    for stage in ("semantic", "coarse", "fine"):
        learner = StageLearner("tiny", "cpu", stage=stage)
        batches = [learner.collate([token_sample() for _ in range(learner.batch_size)]) for _ in range(steps + 1)]
        learner.train_step(batches[0])
        start, targets = time.perf_counter(), 0.0
        for batch in batches[1:]:
            targets += learner.train_step(batch)["tokens"]
        elapsed = time.perf_counter() - start
        seq = sum(int(b["tokens"].numel()) for b in batches[1:])
        print(f"  {stage:8s} batch {learner.batch_size:2d} x {batches[1]['tokens'].shape[1]:4d} tokens: "
              f"{elapsed / steps:5.2f} s/step, {targets / elapsed:6.0f} target tok/s, {seq / elapsed:6.0f} sequence tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=2000)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--recompute-new", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--train-steps", type=int, default=3, help="0 skips the training benchmark")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    bench_decoding(args.context, args.new, args.recompute_new)
    if args.train_steps:
        bench_training(args.train_steps)


if __name__ == "__main__":
    main()
