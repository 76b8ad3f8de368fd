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

Pitch columns: how much of each 40-ms frame's predominant pitch class (the melody-adherence measure's
salience chroma) the 4 coarse levels carry, the levels the coarse stage generates and melody
conditioning must steer. "pitch kept": the fraction of held-out frames whose pitch class is the same
after coding with the 4 coarse levels (chance ~0.1). "pitch CE": a small MLP reads the coarse levels'
quantized latents of the frame and its neighbours, fitted on the training clips and scored on the
held-out clips (cross-entropy in nats against the pitch-class prior, and accuracy; its best epoch of
20, the same for every variant).
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
PITCH_LEVELS = 4  # the coarse levels
PITCH_CONTEXT = 1  # neighbouring 40-ms frames the probe also reads, each side
PITCH_EPOCHS = 20
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


@torch.inference_mode()
def _pitch_table(model, wavs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per 40-ms frame: the coarse levels' quantized latents of it and its neighbours ``[N, 2(2c+1) * D]`` and
    its pitch class; and the fraction of frames whose pitch class survives coding with the coarse levels."""
    from musiclm.evaluation.melody import frame_pitch_classes

    model.eval()
    x, y, kept, total = [], [], 0, 0
    for wav in wavs:
        codes = model.encode(torch.from_numpy(wav)[None], PITCH_LEVELS)  # [1, L, Fa] at 50 Hz
        latent = model.quantizer.decode(codes.transpose(1, 2))[0]  # [Fa, D]
        n = latent.shape[0] // 2  # 40-ms frames
        c = PITCH_CONTEXT
        padded = torch.cat([latent.new_zeros(2 * c, latent.shape[1]), latent[: 2 * n], latent.new_zeros(2 * c, latent.shape[1])])
        x.append(padded.unfold(0, 2 * (2 * c + 1), 2).flatten(1))  # [n, D * 2(2c+1)]
        pitch = frame_pitch_classes(wav, n)[0]
        y.append(torch.as_tensor(pitch))
        decoded = model.decode(codes)[0].numpy()
        kept += int((frame_pitch_classes(decoded, n)[0] == pitch).sum())
        total += n
    return torch.cat(x), torch.cat(y), kept / max(total, 1)


def pitch_information(model, train: list[np.ndarray], heldout: list[np.ndarray], seed: int) -> dict[str, float]:
    """Held-out cross-entropy (nats) of the frames' pitch class from the coarse levels' latents, the prior's,
    the probe's accuracy, and how often decoding the coarse levels keeps the pitch class."""
    import torch.nn.functional as F
    from torch import nn

    x_tr, y_tr, _ = _pitch_table(model, train)
    x_te, y_te, kept = _pitch_table(model, heldout)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    prior = (torch.bincount(y_tr, minlength=12) + 1.0) / (len(y_tr) + 12.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = nn.Sequential(nn.Dropout(0.2), nn.Linear(x_tr.shape[1], 256), nn.ReLU(), nn.Linear(256, 12))
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.05)
    best = {"ce": float("inf"), "accuracy": 0.0}
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(PITCH_EPOCHS):
            probe.train()
            for batch in torch.randperm(len(y_tr), generator=generator).split(256):
                loss = F.cross_entropy(probe(x_tr[batch]), y_tr[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
            probe.eval()
            with torch.no_grad():
                out = probe(x_te)
                ce = float(F.cross_entropy(out, y_te))
            if ce < best["ce"]:
                best = {"ce": ce, "accuracy": float((out.argmax(1) == y_te).float().mean())}
    return {"pitch_prior_ce": float(-prior.log()[y_te].mean()), "pitch_ce": best["ce"],
            "pitch_accuracy": best["accuracy"], "pitch_kept": kept}


def train_variant(name: str, options: dict, train: list[np.ndarray], heldout: torch.Tensor, steps: int,
                  seed: int, heldout_clips: list[np.ndarray]) -> dict[str, float]:
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
    row.update(pitch_information(learner.model, train, heldout_clips, seed))
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
    heldout_clips = corpus(work / "heldout", args.heldout_clips, seed=10_000, seconds=10.0)
    heldout = torch.from_numpy(np.stack(heldout_clips))[:, : 4 * 24000]  # the demo evaluates 4 s of each clip

    from musiclm.tokenizers.soundstream import SoundStream, SoundStreamConfig

    rows: dict[str, dict[str, float]] = {}
    torch.manual_seed(args.seed)
    untrained = SoundStream(SoundStreamConfig.preset("tiny"))
    rows["untrained"] = {**evaluate(untrained, heldout), **pitch_information(untrained, train, heldout_clips, args.seed)}
    for name in args.variants:
        print(f"training {name} ({args.steps} steps) ...", flush=True)
        rows[name] = train_variant(name, {**VARIANTS[name], **extra}, train, heldout, args.steps, args.seed,
                                   heldout_clips)

    print(f"\nSoundStream tiny, {args.steps} steps, {args.threads} thread(s), {heldout.shape[0]} held-out clips x 4 s"
          + (f", options {extra}" if extra else ""))
    header = ["variant", "s/step"] + [f"SI-SNR@{k}" for k in LEVELS] + [f"mel@{k}" for k in LEVELS] + ["ppl l0"]
    header += ["pitch kept", "pitch CE (prior)", "pitch acc"]
    print(" | ".join(header))
    for name, row in rows.items():
        cells = [name, f"{row.get('s_per_step', float('nan')):.2f}"]
        cells += [f"{row[f'si_snr_{k}']:.2f}" for k in LEVELS] + [f"{row[f'mel_{k}']:.3f}" for k in LEVELS]
        cells.append(f"{row['perplexity_l0']:.1f}")
        cells += [f"{row['pitch_kept']:.2f}", f"{row['pitch_ce']:.3f} ({row['pitch_prior_ce']:.3f})", f"{row['pitch_accuracy']:.2f}"]
        print(" | ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "options": extra, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
