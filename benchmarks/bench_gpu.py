"""One-shot GPU check of the three stage Transformers: training steps in fp32 and bf16, KV-cached sampling.

    python benchmarks/bench_gpu.py --preset paper --device cuda --json bench_gpu.json
    python benchmarks/bench_gpu.py --preset tiny --device cpu --steps 1 --new 32     # quick local check

Everything is printed (and, with ``--json``, written) in one run, so that a short lease on a GPU
machine is enough. Weights and tokens are random: speed and memory do not depend on them.

* environment: device, torch and CUDA versions, bf16 support, TF32 setting;
* per stage (semantic, coarse, fine) at the preset: the parameter count (checked against the config's
  formula), and ``StageLearner(preset, device, stage=..., precision=p).train_step`` for p = fp32, bf16
  on ``--batch`` samples of ``crop`` seconds built with ``learner.collate`` (the stage's training crop):
  s/step (mean of ``--steps`` after one warm-up step), target and sequence tokens/s, peak GPU memory,
  loss finite. A batch that runs out of GPU memory is reported as OOM and retried at half the size;
* per stage: KV-cached ``sample`` at batch 1 and 4, fp32 and bf16 weights (``model.to(dtype)``), from a
  prefix as long as the stage's real one (``sequence_lengths`` of its crop), ``--new`` new tokens in
  the stage's allowed ranges: new tokens/s; and a sanity line: max |log-softmax difference| of bf16 vs
  fp32 logits on the same weights (bf16 weights on a prefill, and the fp32 model under autocast);
* the total wall time (the paper preset should take well under 5 minutes on an H100).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from musiclm.generation.sampler import sample  # noqa: E402
from musiclm.models.stages import STAGES, StageConfig, sequence_lengths  # noqa: E402
from musiclm.models.transformer import StageTransformer, TransformerConfig  # noqa: E402
from musiclm.training.stage_learner import DEFAULTS, StageLearner  # noqa: E402

PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OOM = torch.cuda.OutOfMemoryError


# ----------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def fmt_gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]


def expected_parameters(t: TransformerConfig) -> int:
    """Parameters of a StageTransformer from its config: embedding (and frame embedding), shared relative
    bias, blocks (2 bias-free LayerNorms, qkv, proj, (GE)GLU up, down), final norm, head."""
    d, f = t.dim, t.ff_dim
    block = 2 * d + 3 * d * d + d * d + (2 if t.gated_ff else 1) * d * f + f * d
    frames = (t.frame_classes + 1) * d if getattr(t, "frame_classes", 0) else 0  # the melody contour's embedding
    return t.vocab_size * d + frames + t.rel_buckets * t.n_heads + t.n_layers * block + d + t.num_outputs * d


def token_sample(rng: np.random.Generator, seconds: float) -> dict[str, np.ndarray]:
    """A token-shard sample of ``seconds`` of audio (paper rates: 25 Hz semantic, 50 Hz x 12 acoustic)."""
    frames = int(round(seconds * 25))
    return {"acoustic": rng.integers(0, 1024, (2 * frames, 12)).astype(np.int16),
            "semantic": rng.integers(0, 1024, frames).astype(np.int16),
            "mulan": rng.integers(0, 1024, 12).astype(np.int16)}


def real_prefix(cfg: StageConfig, batch: int, rng: np.random.Generator) -> torch.Tensor:
    """A random prefix as long as the stage's prefix for one crop: [batch, prefix_len]."""
    layout, r = cfg.layout, cfg.rates
    n = cfg.crop_frames
    rows = []
    for _ in range(batch):
        parts = [layout.mulan_ids(rng.integers(0, r.conditioning_codebook_size, r.conditioning_codebooks))]
        if cfg.stage == "coarse":
            parts += [layout.semantic_ids(rng.integers(0, r.semantic_codebook_size, n)), [layout.sep]]
        elif cfg.stage == "fine":
            coarse = rng.integers(0, r.acoustic_codebook_size, (n * r.frames_per_semantic, r.coarse_levels))
            parts += [layout.acoustic_ids(coarse, tuple(range(r.coarse_levels))), [layout.sep]]
        rows.append(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))
    prefix = torch.from_numpy(np.stack(rows))
    expected = sequence_lengths(cfg.stage, cfg.crop_seconds, r, cfg.melody_codebooks)[0]
    assert prefix.shape[1] == expected, (prefix.shape, expected)
    return prefix


# ----------------------------------------------------------------------------- training


def train_once(stage: str, preset: str, device: torch.device, precision: str, batch: int, steps: int,
               seconds: float) -> dict[str, Any]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    learner = StageLearner(preset, device, stage=stage, precision=precision, batch_size=batch)
    batches = [learner.collate([token_sample(rng, seconds) for _ in range(batch)]) for _ in range(steps + 1)]
    reset_peak(device)
    losses = [learner.train_step(batches[0])["loss"]]  # warm-up
    sync(device)
    times, targets = [], 0.0
    for b in batches[1:]:
        start = time.perf_counter()
        out = learner.train_step(b)
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(out["loss"])
        targets += out["tokens"]
    step_s = sum(times) / len(times)
    seq = sum(int(b["tokens"].numel()) for b in batches[1:])
    return {"status": "ok", "batch": batch, "seq_len": int(batches[1]["tokens"].shape[1]), "step_s": step_s,
            "target_tok_s": targets / sum(times), "seq_tok_s": seq / sum(times), "peak_gib": peak_gib(device),
            "losses": losses, "loss_finite": bool(np.isfinite(losses).all()),
            "params": sum(p.numel() for p in learner.model.parameters()),
            "params_fp32": all(p.dtype == torch.float32 for p in learner.model.parameters())}


def train_row(stage: str, preset: str, device: torch.device, precision: str, batch: int, steps: int,
              seconds: float) -> dict[str, Any]:
    """``train_once``, halving the batch after each OOM (down to 1)."""
    row: dict[str, Any] = {"stage": stage, "precision": precision, "oom_batches": []}
    while True:
        failure = None
        try:
            return {**row, **train_once(stage, preset, device, precision, batch, steps, seconds)}
        except OOM:
            failure = "OOM"  # freed below, outside the except block that holds the frames' tensors
        except Exception as exc:  # one failing row must not end a one-shot run
            failure = error_text(exc)
        free(device)
        if failure != "OOM":
            return {**row, "status": failure, "batch": batch}
        row["oom_batches"].append(batch)
        if batch == 1:
            return {**row, "status": "OOM", "batch": batch}
        batch //= 2


def print_row(head: str, row: dict[str, Any], figures: Callable[[], str], suffix: str = "") -> None:
    """``head: figures() suffix`` for a row that ran, ``head: status suffix`` for one that did not."""
    print(f"{head}{figures() if row['status'] == 'ok' else ': ' + row['status']}{suffix}", flush=True)


def print_train(row: dict[str, Any]) -> None:
    oom = f"  (OOM at batch {', '.join(map(str, row['oom_batches']))})" if row["oom_batches"] else ""
    print_row(f"  train {row['precision']:4s} batch {row['batch']:2d}", row, lambda: (
        f" x {row['seq_len']:4d}: {row['step_s']:7.3f} s/step, {row['target_tok_s']:9.0f} target tok/s, "
        f"{row['seq_tok_s']:9.0f} seq tok/s, peak {fmt_gib(row['peak_gib'])} GiB, loss "
        f"{row['losses'][0]:.3f} -> {row['losses'][-1]:.3f} ({'finite' if row['loss_finite'] else 'NOT FINITE'}), "
        f"weights fp32: {row['params_fp32']}"), oom)


# ----------------------------------------------------------------------------- sampling


@torch.inference_mode()
def logit_check(model: StageTransformer, prefix: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """fp32 model: prefill log-softmax, and the full forward with and without bf16 autocast (the training path)."""
    model.setup_cache(prefix.shape[0], prefix.shape[1])
    ref = F.log_softmax(model.prefill(prefix).float(), dim=-1)  # [B, V_out]
    model.clear_cache()
    full = F.log_softmax(model(prefix).float(), dim=-1)  # [B, L, V_out]
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        auto = F.log_softmax(model(prefix).float(), dim=-1)
    return {"ref": ref, "autocast_max_abs": float((auto - full).abs().max()),
            "logit_std": float(ref.std())}


@torch.inference_mode()
def bf16_prefill_diff(model: StageTransformer, prefix: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    model.setup_cache(prefix.shape[0], prefix.shape[1])
    got = F.log_softmax(model.prefill(prefix).float(), dim=-1)
    model.clear_cache()
    return {"prefill_max_abs": float((got - ref).abs().max()),
            "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}


def sample_row(model: StageTransformer, cfg: StageConfig, prefix: torch.Tensor, new: int, device: torch.device,
               precision: str) -> dict[str, Any]:
    batch, length = prefix.shape
    row: dict[str, Any] = {"precision": precision, "batch": batch, "prefix": length, "new": new}
    try:
        ranges = cfg.layout.allowed_ranges(new)
        gen = torch.Generator(device=device).manual_seed(0)
        sample(model, prefix, min(8, new), allowed_range=ranges[: min(8, new)], generator=gen)  # warm up kernels
        with torch.inference_mode():  # prefill alone, to report decode-only speed too
            model.setup_cache(batch, length + new)
            sync(device)
            start = time.perf_counter()
            model.prefill(prefix)
            sync(device)
            prefill_s = time.perf_counter() - start
            model.clear_cache()
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        out = sample(model, prefix, new, cfg.temperature, allowed_range=ranges, generator=gen)
        sync(device)
        wall = time.perf_counter() - start
        lo, hi = (torch.as_tensor(ranges[:, i], device=device) for i in (0, 1))
        in_range = bool(((out >= lo) & (out < hi)).all())
        return {**row, "status": "ok", "s": wall, "prefill_s": prefill_s, "tok_s_per_row": new / wall,
                "tok_s_total": batch * new / wall, "decode_ms_per_tok": (wall - prefill_s) / new * 1e3,
                "peak_gib": peak_gib(device), "in_range": in_range}
    except OOM:
        status = "OOM"
    except Exception as exc:  # one failing row must not end a one-shot run
        status = error_text(exc)
    model.clear_cache()
    free(device)
    return {**row, "status": status}


def print_sample(row: dict[str, Any]) -> None:
    print_row(f"  sample {row['precision']:4s} batch {row['batch']}, prefix {row['prefix']:4d} + {row['new']} new", row,
              lambda: (f": {row['tok_s_per_row']:7.1f} new tok/s per row ({row['tok_s_total']:7.1f} total), "
                       f"{row['decode_ms_per_tok']:6.2f} ms/step decode, prefill {row['prefill_s'] * 1e3:6.1f} ms, "
                       f"peak {fmt_gib(row['peak_gib'])} GiB, tokens in range: {row['in_range']}"))


def bench_sampling(cfg: StageConfig, device: torch.device, new: int, batches: list[int]) -> dict[str, Any]:
    prefix_len = sequence_lengths(cfg.stage, cfg.crop_seconds, cfg.rates, cfg.melody_codebooks)[0]
    new = min(new, cfg.transformer.max_seq_len - prefix_len)
    rng = np.random.default_rng(1)
    prefixes = {b: real_prefix(cfg, b, rng).to(device) for b in batches}
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: no minutes of CPU init for 420M parameters
        model = StageTransformer(dataclasses.replace(cfg.transformer)).eval()
    result: dict[str, Any] = {"rows": []}
    try:
        check = logit_check(model, prefixes[batches[0]], device)
    except Exception as exc:  # reported in the logits line
        check = {"error": error_text(exc)}
        free(device)
    for precision in PRECISIONS:
        model.to(DTYPES[precision])
        if precision == "bf16" and "ref" in check:
            try:
                check.update(bf16_prefill_diff(model, prefixes[batches[0]], check["ref"]))
            except Exception as exc:  # reported in the logits line
                check["error"] = error_text(exc)
        for b in batches:
            row = sample_row(model, cfg, prefixes[b], new, device, precision)
            print_sample(row)
            result["rows"].append(row)
    check.pop("ref", None)
    result["logits"] = check
    if "error" in check:
        print(f"  logits check failed: {check['error']}", flush=True)
    else:
        print(f"  logits bf16 vs fp32 (same weights, log-softmax, fp32 logit std {check['logit_std']:.3f}): "
              f"bf16 weights prefill max |diff| {check.get('prefill_max_abs', math.nan):.4f}, argmax agree "
              f"{check.get('argmax_agree', math.nan):.2f}; autocast forward max |diff| "
              f"{check['autocast_max_abs']:.4f}", flush=True)
    del model, prefixes
    free(device)
    return result


# ----------------------------------------------------------------------------- main


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                           "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(name=props.name, memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}",
                   bf16_supported=torch.cuda.is_bf16_supported(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                   bf16_supported=True)  # CPU autocast supports bf16 (slowly without native bf16 units)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "paper"], default="paper")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--batch", type=int, default=None,
                        help="training sequences per step (default 8 for paper, the learner's default for tiny)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps after one warm-up step")
    parser.add_argument("--new", type=int, default=256, help="new tokens per sampling row")
    parser.add_argument("--sample-batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls for the fp32 rows (torch's default: off)")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--no-sample", action="store_true")
    parser.add_argument("--json", help="also write every number here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_start = time.perf_counter()
    env = environment(device)
    print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in env.items()), flush=True)
    print(f"preset {args.preset}, batch {args.batch or 'default'}, {args.steps} timed steps, {args.new} new tokens, "
          f"sampling batches {args.sample_batches}", flush=True)
    report: dict[str, Any] = {"env": env, "args": vars(args), "stages": {}}
    for stage in args.stages:
        stage_start = time.perf_counter()
        cfg = StageConfig.preset(stage, args.preset)
        t = cfg.transformer
        expected = expected_parameters(t)
        with torch.device("meta"):  # counts without allocating
            params = StageTransformer(t).num_parameters()
        seconds = {"paper": 30.0, "tiny": 10.0}[args.preset]  # samples as long as the semantic crop: every crop fits
        batch = args.batch or (8 if args.preset == "paper" else DEFAULTS[args.preset]["batch_size"][stage])
        prefix, generated = sequence_lengths(stage, cfg.crop_seconds, cfg.rates, cfg.melody_codebooks)
        print(f"\n{stage}: {params / 1e6:.1f}M parameters ({'= config formula' if params == expected else f'MISMATCH: formula {expected}'}), "
              f"dim {t.dim} x {t.n_layers} layers, {t.n_heads} heads, FF {t.ff_dim}{' GEGLU' if t.gated_ff else ''}, "
              f"vocab {t.vocab_size} -> {t.num_outputs}, crop {cfg.crop_seconds:g} s = {prefix} + {generated} tokens, "
              f"max_seq_len {t.max_seq_len}", flush=True)
        entry: dict[str, Any] = {"params": params, "expected_params": expected, "params_match": params == expected,
                                 "prefix": prefix, "generated": generated, "train": [], "sample": None}
        if not args.no_train:
            for precision in PRECISIONS:
                row = train_row(stage, args.preset, device, precision, batch, args.steps, seconds)
                print_train(row)
                entry["train"].append(row)
                free(device)
        if not args.no_sample:
            entry["sample"] = bench_sampling(cfg, device, args.new, args.sample_batches)
        entry["wall_s"] = time.perf_counter() - stage_start
        report["stages"][stage] = entry
        free(device)
    report["wall_s"] = time.perf_counter() - run_start
    print(f"\ntotal wall time {report['wall_s']:.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
