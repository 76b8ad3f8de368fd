"""Throughput of every tokenizer: audio seconds per second (texts per second for text towers).

Ours at a preset (SoundStream encode and decode, w2v-BERT features + k-means, MuLan audio and text
embedding) and, where ``musiclm.tokenizers.pretrained`` is installed, the pretrained adapters at
their released sizes (EnCodec encode and decode, HuBERT and w2v-BERT 2.0 features + our k-means,
CLAP audio and text). All weights are random (throughput does not depend on them; nothing is
downloaded); the models are built one at a time and freed, so the paper preset fits in RAM.

    python benchmarks/bench_tokenizers.py                                  # tiny, CPU, 10 s of audio
    python benchmarks/bench_tokenizers.py --preset paper --seconds 5
    python benchmarks/bench_tokenizers.py --device cuda --preset paper --batch 8 --seconds 30

Each row: one warm-up call, then ``--repeats`` timed calls (``torch.cuda.synchronize()`` around
each on CUDA); the median is reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

SR = 24000
TEXTS = [
    "a calm piano melody with soft strings",
    "energetic rock song with distorted electric guitars and a driving drum beat",
    "lo-fi hip hop beat, vinyl crackle, mellow electric piano, relaxed",
    "an orchestral film score with brass fanfares and timpani rolls",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``fn()`` after one warm-up call."""
    with torch.inference_mode():
        fn()
        _sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _random_kmeans(k: int, dim: int, device: torch.device) -> Any:
    from musiclm.tokenizers.kmeans import KMeans

    kmeans = KMeans(k, dim)
    kmeans.centroids.normal_()  # assignment costs the same whatever the centroids
    kmeans.fitted.fill_(True)
    return kmeans.to(device)


def _random_rvq(dim: int, device: torch.device) -> Any:
    from musiclm.constants import MULAN_CODEBOOK_SIZE, MULAN_CODEBOOKS
    from musiclm.tokenizers.rvq import ResidualVQ

    return ResidualVQ(dim, MULAN_CODEBOOKS, MULAN_CODEBOOK_SIZE).to(device).eval()


Row = tuple[str, str, Callable[[], Any], int]  # (name, unit, call, parameters)
Group = Callable[[], list[Row]]  # builds one model (or two sharing weights) and returns its rows


def our_groups(preset: str, device: torch.device, wav: torch.Tensor) -> list[Group]:
    from musiclm.tokenizers.mulan import MuLan, MuLanConditioner, MuLanConfig
    from musiclm.tokenizers.semantic import SemanticTokenizer, W2VBert, W2VBertConfig
    from musiclm.tokenizers.soundstream import SoundStream, SoundStreamConfig

    def soundstream() -> list[Row]:
        model = SoundStream(SoundStreamConfig.preset(preset)).to(device).eval()
        with torch.inference_mode():
            codes = model.encode(wav)
        n = _params(model)
        return [("SoundStream encode", "audio s/s", lambda: model.encode(wav), n),
                ("SoundStream decode", "audio s/s", lambda: model.decode(codes), n)]

    def w2vbert() -> list[Row]:
        model = W2VBert(W2VBertConfig.preset(preset)).to(device).eval()
        semantic = SemanticTokenizer(model, _random_kmeans(1024, model.feature_dim, device)).to(device).eval()
        return [("w2v-BERT + k-means", "audio s/s", lambda: semantic.tokens(wav), _params(model))]

    def mulan() -> list[Row]:
        model = MuLan(MuLanConfig.preset(preset)).to(device).eval()
        conditioner = MuLanConditioner(model, _random_rvq(model.embedding_dim, device))
        return [("MuLan audio (+ RVQ)", "audio s/s", lambda: conditioner.tokens_audio(wav), _params(model)),
                ("MuLan text (+ RVQ)", "texts/s", lambda: conditioner.tokens_text(TEXTS), _params(model))]

    return [soundstream, w2vbert, mulan]


def pretrained_groups(device: torch.device, wav: torch.Tensor, work: Path) -> list[Group]:
    from musiclm.tokenizers import pretrained
    from musiclm.tokenizers.backends import BackendSpec
    from musiclm.tokenizers.mulan import MuLanConditioner
    from musiclm.tokenizers.semantic import SemanticTokenizer

    def spec(role: str, backend: str) -> BackendSpec:
        return BackendSpec(role, backend, str(pretrained.save_random_backend(backend, work / backend, size="full")))

    def encodec() -> list[Row]:
        model = pretrained.load_acoustic(spec("acoustic", "encodec"), device)
        with torch.inference_mode():
            codes = model.encode(wav)
        n = _params(model)
        return [("EnCodec encode", "audio s/s", lambda: model.encode(wav), n),
                ("EnCodec decode", "audio s/s", lambda: model.decode(codes), n)]

    def speech(backend: str, label: str) -> Group:
        def build() -> list[Row]:
            features = pretrained.load_semantic_features(spec("semantic", backend), device)
            semantic = SemanticTokenizer(features, _random_kmeans(1024, features.feature_dim, device)).to(device).eval()
            return [(label, "audio s/s", lambda: semantic.tokens(wav), _params(features))]

        return build

    def clap() -> list[Row]:
        towers = pretrained.load_conditioner_towers(spec("conditioner", "clap"), device)
        conditioner = MuLanConditioner(towers, _random_rvq(towers.embedding_dim, device))
        return [("CLAP audio (+ RVQ)", "audio s/s", lambda: conditioner.tokens_audio(wav), _params(towers)),
                ("CLAP text (+ RVQ)", "texts/s", lambda: conditioner.tokens_text(TEXTS), _params(towers))]

    return [encodec, speech("hubert", "HuBERT + k-means"), speech("w2v-bert-2.0", "w2v-BERT 2.0 + k-means"), clap]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "paper"), help="size of our tokenizers")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per row of the batch")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-pretrained", action="store_true", help="only our tokenizers")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    samples = int(round(args.seconds * SR)) // 960 * 960  # whole semantic frames
    rng = np.random.default_rng(0)
    t = np.arange(samples) / SR
    wav = torch.from_numpy(np.stack([
        0.3 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t) + 0.05 * rng.standard_normal(samples)
        for _ in range(args.batch)
    ]).astype(np.float32)).to(device)  # [B, T]
    audio_seconds = args.batch * samples / SR
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; preset {args.preset}; batch {args.batch} x {samples / SR:g} s; median of {args.repeats}")
    print(f"{'tokenizer':26}{'params':>12}{'seconds/call':>14}{'throughput':>14}  unit")

    results = []

    def report(groups: list[Group]) -> None:
        for group in groups:  # one model at a time: built, timed, freed
            for label, unit, fn, params in group():
                seconds = time_call(fn, device, args.repeats)
                amount = len(TEXTS) if unit == "texts/s" else audio_seconds
                results.append({"tokenizer": label, "params": params, "seconds_per_call": seconds,
                                "throughput": amount / seconds, "unit": unit})
                print(f"{label:26}{params / 1e6:>11.1f}M{seconds:>14.4f}{amount / seconds:>14.1f}  {unit}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    report(our_groups(args.preset, device, wav))
    if not args.no_pretrained:
        try:
            from musiclm.tokenizers import pretrained
        except ImportError:
            pretrained = None
        if pretrained is None or not hasattr(pretrained, "save_random_backend"):
            print("(musiclm.tokenizers.pretrained.save_random_backend is not available: no pretrained rows)")
        else:
            with tempfile.TemporaryDirectory(prefix="bench-tokenizers-") as tmp:
                report(pretrained_groups(device, wav, Path(tmp)))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "preset": args.preset, "batch": args.batch,
                                               "seconds": samples / SR, "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
