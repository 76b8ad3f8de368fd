"""Does the output follow the melody? Melody adherence with and without the melody, and with pitch guidance.

    python benchmarks/bench_pitch_guidance.py --workdir musiclm-demo              # after `musiclm demo`
    python benchmarks/bench_pitch_guidance.py --workdir musiclm-demo --clips 8 --weights 3,10,30

For each held-out clip of the demo's token shards, the clip's own audio is the melody (its melody tokens and
contour) and its MuLan tokens the prompt; the whole cascade generates the clip's length:

    random codes            coarse codes drawn independently from their training histogram, decoded: what
                            noise-like codes score (the level the stages must beat to carry any melody)
    without the melody      the cascade given M only (the baseline of issue 4)
    with the melody         the cascade given M, the melody tokens and the contour (the stages alone)
    + pitch guidance w      the same, the coarse draws steered by the pitch probe with weight w
                            (:mod:`musiclm.models.pitch_probe`; ``checkpoints/pitch_probe``, fitted here if missing)

Adherence is ``musiclm.evaluation.melody.melody_adherence`` (0 = chance, 1 = the same melody); every row uses
the same seed. The last lines count the clips where each row beats "without the melody".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_melody_path import clips  # noqa: E402  (the held-out clips with their source audio)


def fit_probe(work: Path, steps: int) -> None:
    """Train ``checkpoints/pitch_probe`` in process on ``shards/tokens`` (what `musiclm train pitch_probe` does)."""
    from musiclm.data.shards import iter_samples
    from musiclm.training.pitch_probe_learner import PitchProbeLearner

    train = list(iter_samples(str(work / "shards" / "tokens"), split_by_node=False, split_by_worker=False))
    learner = PitchProbeLearner("tiny", codec_init=str(work / "checkpoints"), token_info=train[0]["json"].get("token_info"))
    rng = np.random.default_rng(0)
    for _ in range(steps):
        learner.train_step(learner.collate([train[i] for i in rng.integers(0, len(train), learner.batch_size)]))
    learner.export(str(work / "checkpoints" / "pitch_probe"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="musiclm-demo", help="a `musiclm demo` working folder")
    parser.add_argument("--clips", type=int, default=8, help="held-out clips to generate for")
    parser.add_argument("--weights", default="10", help="pitch guidance weights, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-steps", type=int, default=1000, help="steps of the probe when it must be fitted")
    args = parser.parse_args()
    from musiclm.evaluation.melody import melody_adherence
    from musiclm.generation.cascade import Cascade
    from musiclm.generation.plan import drive, plan_steps
    from musiclm.generation.spec import GenerationSpec
    from musiclm.tokenizers.contour import melody_contour

    work = Path(args.workdir)
    if not (work / "checkpoints" / "pitch_probe").is_dir():
        print("no checkpoints/pitch_probe: fitting one", flush=True)
        fit_probe(work, args.probe_steps)
    cascade = Cascade.load(work / "checkpoints")
    samples = clips(work / "shards" / "heldout-tokens", args.clips)
    training = clips(work / "shards" / "tokens", 32)
    Kc = cascade.coarse.config.rates.coarse_levels
    V = cascade.coarse.config.rates.acoustic_codebook_size
    codes = np.concatenate([np.asarray(s["acoustic"])[:, :Kc] for s in training])  # [N, Kc]
    histogram = np.stack([np.bincount(codes[:, q], minlength=V) + 0.1 for q in range(Kc)])  # [Kc, V]
    histogram /= histogram.sum(1, keepdims=True)

    def generate(sample: dict, melody: bool, weight: float) -> np.ndarray:
        mulan = np.asarray(sample["mulan"], dtype=np.int64)[None]  # [1, Qm]: the clip's own M_A
        contour = None
        if melody:
            contour = sample.get("contour")
            contour = melody_contour(sample["audio"]) if contour is None else np.asarray(contour, dtype=np.int64)
        spec = GenerationSpec.single("(the clip's MuLan tokens)", float(sample["json"]["end"] - sample["json"]["start"]),
                                     seed=args.seed, melody_tokens=np.asarray(sample["melody"]) if melody else None,
                                     melody_contour=contour, pitch_guidance=weight)
        execute = cascade.executor()
        return np.concatenate(list(drive(plan_steps(spec, cascade.configs),
                                         lambda call: mulan if call.kind == "condition" else execute(call))), axis=1)[0]

    rng = np.random.default_rng(args.seed)
    weights = [float(w) for w in args.weights.split(",")]
    rows: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for sample in samples:
        frames = np.asarray(sample["acoustic"]).shape[0]
        random_codes = np.stack([rng.choice(V, frames, p=histogram[q]) for q in range(Kc)])  # [Kc, F]
        runs = [("random codes", None, 0.0), ("without the melody", False, 0.0), ("with the melody", True, 0.0)]
        runs += [(f"+ pitch guidance {w:g}", True, w) for w in weights]
        for name, melody, weight in runs:
            start = time.perf_counter()
            if melody is None:
                wav = cascade.decode(torch.as_tensor(random_codes[None]))
            else:
                wav = generate(sample, melody, weight)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            rows.setdefault(name, []).append(melody_adherence(sample["audio"], wav))
        print(f"  {sample['__key__']}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)
    width = max(len(k) for k in rows)
    print(f"\nmelody adherence on {len(samples)} held-out clips of {work} (mean ± std; generation seconds per clip):")
    for name, values in rows.items():
        print(f"  {name:<{width}}  {np.mean(values):.3f} ± {np.std(values):.3f}   ({seconds[name] / len(samples):.1f} s)")
    base = np.asarray(rows["without the melody"])
    for name, values in rows.items():
        if name != "without the melody":
            v = np.asarray(values)
            print(f"  {name:<{width}}  above 'without the melody' on {int((v > base).sum())} of {len(v)} clips "
                  f"(equal on {int((v == base).sum())}); ratio of means {np.mean(v) / max(np.mean(base), 1e-9):.2f}")
    print(json.dumps({k: float(np.mean(v)) for k, v in rows.items()}))


if __name__ == "__main__":
    main()
