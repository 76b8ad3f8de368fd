"""Where does the melody get lost? Melody adherence along the cascade, on held-out clips.

    python benchmarks/bench_melody_path.py --workdir musiclm-demo            # after `musiclm demo`
    python benchmarks/bench_melody_path.py --workdir musiclm-demo --clips 8

For each held-out clip of the demo's token shards (``shards/heldout-tokens``: its semantic, acoustic,
MuLan and melody tokens, and the source audio they were made from), the clip is the reference melody
and each row replaces one more part of the cascade with what the models generate:

    codec, 4 coarse levels   the clip's true coarse acoustic codes, decoded      (the ceiling of the path)
    codec, all levels        the clip's true acoustic codes, decoded
    acoustic stages          the clip's true semantic tokens (and its melody) -> coarse -> fine -> decoded
    ..., no melody           the same without the clip's melody tokens and contour
    whole cascade + melody   M and the clip's melody tokens (and contour) -> semantic -> ... -> decoded
    whole cascade, no melody the same request without the melody tokens (the baseline)

Adherence is ``musiclm.evaluation.melody.melody_adherence`` (0 = chance, 1 = the same melody).

It also measures how much pitch the semantic representation carries: the predominant pitch class of
each 40-ms frame (the adherence measure's salience chroma) predicted on held-out clips from the
semantic tokens (counts, smoothed) and from the w2v-BERT features the tokens quantize (a linear
probe), in nats against the pitch-class prior. Melody can only reach the audio through the semantic
tokens if they carry it. Training clips (``shards/tokens``) fit the predictors; held-out clips score them.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def clips(token_dir: Path, limit: int) -> list[dict]:
    """Token samples with their source audio (mono 24 kHz, the window the tokens were made from)."""
    from musiclm.audio import load_audio
    from musiclm.data.shards import iter_samples

    out = []
    for sample in iter_samples(str(token_dir), split_by_node=False, split_by_worker=False):
        meta = sample["json"]
        wav = load_audio(meta["source"])
        start = int(round(meta["start"] * 24_000))
        sample["audio"] = wav[start : start + int(round((meta["end"] - meta["start"]) * 24_000))]
        out.append(sample)
        if len(out) >= limit:
            break
    return out


def adherence_rows(ckpt: Path, samples: list[dict], seed: int, guidance: float = 1.0) -> dict[str, list[float]]:
    from musiclm.evaluation.melody import melody_adherence
    from musiclm.generation.cascade import Cascade
    from musiclm.generation.plan import drive, plan_steps
    from musiclm.generation.spec import GenerationSpec
    from musiclm.tokenizers.contour import melody_contour

    cascade = Cascade.load(ckpt)
    coarse_levels = cascade.configs["coarse"].rates.coarse_levels
    melody_stages = any(cfg.melody_codebooks or cfg.contour for cfg in cascade.configs.values())
    rows: dict[str, list[float]] = {}

    def generate(sample: dict, semantic_given: bool, melody: bool) -> np.ndarray:
        mulan = np.asarray(sample["mulan"], dtype=np.int64)[None]  # [1, Qm]: the clip's own M_A
        tokens = np.asarray(sample["melody"], dtype=np.int64) if melody and "melody" in sample else None
        contour = None
        if melody and any(cfg.contour for cfg in cascade.configs.values()):
            contour = sample.get("contour")
            contour = melody_contour(sample["audio"]) if contour is None else np.asarray(contour, dtype=np.int64)
        spec = GenerationSpec.single("(the clip's MuLan tokens)", float(sample["json"]["end"] - sample["json"]["start"]),
                                     seed=seed, num_samples=1, melody_tokens=tokens, melody_contour=contour,
                                     guidance_scale=guidance)
        execute, position = cascade.executor(), [0]
        semantic = np.asarray(sample["semantic"], dtype=np.int64)[None]  # [1, Fs]

        def run(call):
            if call.kind == "condition":
                return mulan
            if call.kind == "semantic" and semantic_given:
                n = call.kwargs["num_new"]
                position[0] += n
                return semantic[:, position[0] - n : position[0]]
            return execute(call)

        return np.concatenate(list(drive(plan_steps(spec, cascade.configs), run)), axis=1)[0]

    for sample in samples:
        reference = sample["audio"]
        codes = torch.as_tensor(np.asarray(sample["acoustic"], dtype=np.int64).T[None])  # [F, K] -> [1, K, F]
        outputs = {
            "codec, 4 coarse levels": cascade.decode(codes[:, :coarse_levels]),
            "codec, all levels": cascade.decode(codes),
            "acoustic stages (true semantic)": generate(sample, True, melody_stages),
        }
        if melody_stages:
            outputs["acoustic stages (true semantic), no melody"] = generate(sample, True, False)
            outputs["whole cascade + melody"] = generate(sample, False, True)
        outputs["whole cascade, no melody"] = generate(sample, False, False)
        for name, wav in outputs.items():
            rows.setdefault(name, []).append(melody_adherence(reference, wav))
        print(f"  {sample['__key__']}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)
    return rows


def pitch_information(ckpt: Path, train: list[dict], heldout: list[dict]) -> dict[str, float]:
    """Held-out cross-entropy (nats) of the frames' pitch class: prior, from semantic tokens, from features."""
    from musiclm.evaluation.melody import frame_pitch_classes
    from musiclm.tokenizers import backends

    features = backends.load_semantic_features(ckpt)

    def table(samples: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens, feats, pitch = [], [], []
        for s in samples:
            semantic = np.asarray(s["semantic"], dtype=np.int64)
            with torch.inference_mode():
                f = features.features(torch.from_numpy(s["audio"])[None])[0].float().numpy()  # [Fs, D]
            n = min(len(semantic), len(f))
            tokens.append(semantic[:n])
            feats.append(f[:n])
            pitch.append(frame_pitch_classes(s["audio"], n)[0])
        return np.concatenate(tokens), np.concatenate(feats), np.concatenate(pitch)

    tok_tr, feat_tr, pc_tr = table(train)
    tok_te, feat_te, pc_te = table(heldout)
    prior = (np.bincount(pc_tr, minlength=12) + 1.0) / (len(pc_tr) + 12.0)
    joint, per_token, smooth = Counter(zip(tok_tr.tolist(), pc_tr.tolist())), Counter(tok_tr.tolist()), 30.0
    token_nll = -np.mean([np.log((joint[(t, p)] + smooth * prior[p]) / (per_token[t] + smooth))
                          for t, p in zip(tok_te.tolist(), pc_te.tolist())])
    mean, std = feat_tr.mean(0), feat_tr.std(0) + 1e-6
    x_tr = torch.tensor((feat_tr - mean) / std, dtype=torch.float32)
    x_te = torch.tensor((feat_te - mean) / std, dtype=torch.float32)
    probe = torch.nn.Linear(x_tr.shape[1], 12)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=1e-4)
    y_tr, y_te = torch.as_tensor(pc_tr), torch.as_tensor(pc_te)
    for _ in range(300):
        loss = F.cross_entropy(probe(x_tr), y_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        probe_nll = float(F.cross_entropy(probe(x_te), y_te))
        accuracy = float((probe(x_te).argmax(1) == y_te).float().mean())
    return {"prior": float(-np.mean(np.log(prior[pc_te]))), "semantic_tokens": float(token_nll),
            "features_linear_probe": probe_nll, "probe_accuracy": accuracy,
            "majority_accuracy": float(np.mean(pc_te == prior.argmax())), "frames": int(len(pc_te))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="musiclm-demo", help="a `musiclm demo` working folder")
    parser.add_argument("--clips", type=int, default=4, help="held-out clips to generate for")
    parser.add_argument("--probe-clips", type=int, default=90, help="training clips fitting the pitch predictors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance scale of every generation (1: none; the same with and without melody)")
    args = parser.parse_args()
    work = Path(args.workdir)
    ckpt, shards = work / "checkpoints", work / "shards"
    heldout = clips(shards / "heldout-tokens", max(args.clips, 16))
    print(f"melody adherence along the cascade ({args.clips} held-out clips of {ckpt}, guidance {args.guidance}):")
    rows = adherence_rows(ckpt, heldout[: args.clips], args.seed, args.guidance)
    width = max(len(k) for k in rows)
    for name, values in rows.items():
        print(f"  {name:<{width}}  {np.mean(values):.3f} ± {np.std(values):.3f}")
    info = pitch_information(ckpt, clips(shards / "tokens", args.probe_clips), heldout)
    print(f"pitch class of a 40-ms frame on {info['frames']} held-out frames (cross-entropy, nats; lower = more "
          f"pitch information): prior {info['prior']:.3f}, from semantic tokens {info['semantic_tokens']:.3f}, "
          f"from w2v-BERT features (linear probe) {info['features_linear_probe']:.3f} "
          f"(accuracy {info['probe_accuracy']:.2f} vs majority {info['majority_accuracy']:.2f})")
    print(json.dumps({"adherence": {k: float(np.mean(v)) for k, v in rows.items()}, "pitch_information": info}))


if __name__ == "__main__":
    main()
