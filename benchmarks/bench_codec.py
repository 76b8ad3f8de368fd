"""SoundStream ``tiny`` at the demo's budget: held-out quality of training variants, side by side.

    .venv/bin/python benchmarks/bench_codec.py --steps 400 --variants ema factorized
    .venv/bin/python benchmarks/bench_codec.py --steps 150 --variants ema --set commitment_weight=10
    .venv/bin/python benchmarks/bench_codec.py --variants factorized --set lr=0.002 batch_size=4 wave_weight=0.0 adversarial_start=250  # the old tiny

Each variant trains a fresh ``SoundStreamLearner("tiny")`` (options as the runner would pass them) on
crops of demo-corpus clips, the demo's 400 steps by default, then encodes -> decodes 4 s of held-out
clips (another corpus seed, as the demo's evaluation) with 1, 2, 4, 8 and 12 RVQ levels and prints
SI-SNR, multi-scale mel distance (``musiclm.evaluation.learning``), level-0 code perplexity and the
training time; the untrained codec is the baseline row. Variants:

* ``ema``         SoundStream's EMA codebooks (k-means init, dead-code restarts, commitment loss)
* ``factorized``  DAC's factorized, gradient-learned codes
* ``ema-nodrop`` / ``factorized-nodrop``  the same without quantizer dropout (every step uses 12 levels)
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

VARIANTS: dict[str, dict] = {
    "ema": {"quantizer": "ema"},
    "factorized": {"quantizer": "factorized"},
    "ema-nodrop": {"quantizer": "ema", "quantizer_dropout": 0.0},
    "factorized-nodrop": {"quantizer": "factorized", "quantizer_dropout": 0.0},
}
LEVELS = (1, 2, 4, 8, 12)


def corpus(folder: Path, clips: int, seed: int, seconds: float) -> list[np.ndarray]:
    from musiclm.audio import load_audio
    from musiclm.data.demo_corpus import generate_corpus

    if not (folder / "captions.jsonl").exists():
        generate_corpus(str(folder), clips=clips, seconds=seconds, seed=seed, progress=False)
    return [load_audio(str(p)) for p in sorted((folder / "audio").glob("*.wav"))]


@torch.inference_mode()
def evaluate(model, wavs: torch.Tensor) -> dict[str, float]:
    from musiclm.evaluation.learning import mel_distance, si_snr
    from musiclm.training.soundstream_learner import code_perplexity

    model.eval()
    codes = model.encode(wavs)  # [B, 12, F]
    row: dict[str, float] = {"perplexity_l0": code_perplexity(codes[:, 0], model.codebook_size)}
    for k in LEVELS:
        recon = model.decode(codes[:, :k])
        row[f"si_snr_{k}"] = float(si_snr(recon, wavs).mean())
        row[f"mel_{k}"] = float(mel_distance(recon, wavs).mean())
    return row


def train_variant(name: str, options: dict, train: list[np.ndarray], heldout: torch.Tensor, steps: int,
                  seed: int) -> dict[str, float]:
    from musiclm.training.soundstream_learner import SoundStreamLearner

    learner = SoundStreamLearner("tiny", "cpu", seed=seed, **options)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    last: dict[str, float] = {}
    for step in range(steps):
        picks = rng.choice(len(train), learner.batch_size, replace=False)
        last = learner.train_step(learner.collate([{"wav": train[i]} for i in picks]))
        if (step + 1) % 50 == 0:
            print(f"  {name} step {step + 1}: mel_loss {last['mel_loss']:.2f} distance {last['mel_distance']:.3f} "
                  f"codes_l0 {last['codes_used_level0']:.0f}", flush=True)
    seconds = time.perf_counter() - start
    row = evaluate(learner.model, heldout)
    row.update(train_seconds=seconds, s_per_step=seconds / max(steps, 1))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--variants", nargs="+", default=["ema", "factorized"], choices=sorted(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], help="extra learner options key=value (python literals)")
    parser.add_argument("--train-clips", type=int, default=32)
    parser.add_argument("--heldout-clips", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "musiclm-bench-codec"))
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extra = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)}

    work = Path(args.workdir)
    train = corpus(work / "train", args.train_clips, seed=0, seconds=10.0)
    heldout = torch.from_numpy(np.stack(corpus(work / "heldout", args.heldout_clips, seed=10_000, seconds=10.0)))
    heldout = heldout[:, : 4 * 24000]  # the demo evaluates 4 s of each held-out clip

    from musiclm.tokenizers.soundstream import SoundStream, SoundStreamConfig

    rows: dict[str, dict[str, float]] = {}
    torch.manual_seed(args.seed)
    rows["untrained"] = evaluate(SoundStream(SoundStreamConfig.preset("tiny")), heldout)
    for name in args.variants:
        print(f"training {name} ({args.steps} steps) ...", flush=True)
        rows[name] = train_variant(name, {**VARIANTS[name], **extra}, train, heldout, args.steps, args.seed)

    print(f"\nSoundStream tiny, {args.steps} steps, {args.threads} thread(s), {heldout.shape[0]} held-out clips x 4 s"
          + (f", options {extra}" if extra else ""))
    header = ["variant", "s/step"] + [f"SI-SNR@{k}" for k in LEVELS] + [f"mel@{k}" for k in LEVELS] + ["ppl l0"]
    print(" | ".join(header))
    for name, row in rows.items():
        cells = [name, f"{row.get('s_per_step', float('nan')):.2f}"]
        cells += [f"{row[f'si_snr_{k}']:.2f}" for k in LEVELS] + [f"{row[f'mel_{k}']:.3f}" for k in LEVELS]
        cells.append(f"{row['perplexity_l0']:.1f}")
        print(" | ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "options": extra, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
