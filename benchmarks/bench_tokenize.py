"""Tokenization throughput: the Beam job against a plain Python loop over the same tokenizers.

Both sides do the same work on the same files — decode + resample every file, cut crop windows,
tokenize them in batches of 8 with one TokenizerBundle, write the token shards — and both timings
include loading the tokenizers. The ratio is Beam's overhead (target: <= 1.2x).

    python benchmarks/bench_tokenize.py --corpus WORK/corpus/audio --checkpoints WORK/checkpoints
    python benchmarks/bench_tokenize.py            # makes a small demo corpus + untrained tiny tokenizers

Extra arguments after ``--`` go to Beam (e.g. ``-- --direct_num_workers=2``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def plain_loop(uris: list[str], out_dir: str, ckpt_dir: str, window_seconds: float, num_shards: int) -> dict:
    """The same work as the Beam job, in one Python loop."""
    from musiclm.audio import AudioError, load_audio, window_starts
    from musiclm.constants import SAMPLE_RATE, SHARD_SCHEMA_VERSION
    from musiclm.data import shards as sh
    from musiclm.tokenizers.bundle import TokenizerBundle

    start = time.perf_counter()
    bundle = TokenizerBundle.load(ckpt_dir)
    window = int(round(window_seconds * SAMPLE_RATE))
    pending: list[tuple[str, str, float, object]] = []
    by_shard: dict[int, list[dict]] = {}
    windows = 0

    def flush() -> None:
        tokens = bundle.tokenize_windows([w for *_, w in pending])
        for (key, uri, t0, _), tok in zip(pending, tokens):
            meta = {"key": key, "source": uri, "start": t0, "end": t0 + window_seconds, "caption": "", "aspects": [],
                    "tokenizers": bundle.ids, "schema": SHARD_SCHEMA_VERSION}
            by_shard.setdefault(sh.shard_index(key, num_shards), []).append({"__key__": key, "json": meta, **tok})
        pending.clear()

    for uri in uris:
        try:
            wav = load_audio(uri)
        except AudioError:
            continue
        for s in window_starts(wav.shape[0], window, window):
            t0 = s / SAMPLE_RATE
            pending.append((sh.sample_key(uri, t0), uri, t0, wav[s : s + window]))
            windows += 1
            if len(pending) == 8:
                flush()
    if pending:
        flush()
    for index, samples in by_shard.items():
        sh.write_shard(sh.join_url(out_dir, sh.shard_name("tokens", index)), samples)
    wall = time.perf_counter() - start
    return {"windows": windows, "audio_seconds": windows * window_seconds, "wall_seconds": wall}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", help="audio folder (default: generate a small demo corpus)")
    parser.add_argument("--checkpoints", help="folder with the tokenizers (default: untrained tiny tokenizers)")
    parser.add_argument("--clips", type=int, default=24, help="clips of the generated corpus")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the generated clips")
    parser.add_argument("--window-seconds", type=float, default=None, help="default: the preset's semantic crop")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (default: torch's; 1 is faster on a busy machine)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat (alternating the order) and take medians")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    from musiclm.pipelines.prepare_audio import default_num_shards, expand_inputs
    from musiclm.pipelines.tokenize import default_window_seconds, run_tokenize
    from musiclm.tokenizers.bundle import TokenizerBundle, save_random_tokenizers

    if args.threads:
        torch.set_num_threads(args.threads)  # the in-process Beam runner shares this setting
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        work = Path(tmp)
        corpus = args.corpus
        if corpus is None:
            from musiclm.data.demo_corpus import generate_corpus

            generate_corpus(str(work / "corpus"), clips=args.clips, seconds=args.seconds, seed=0, progress=False)
            corpus = str(work / "corpus" / "audio")
        ckpt = args.checkpoints
        if ckpt is None:
            ckpt = str(work / "checkpoints")
            save_random_tokenizers(ckpt, "tiny")
        window_seconds = args.window_seconds or default_window_seconds(TokenizerBundle.read_preset(ckpt))
        uris = expand_inputs([corpus])
        num_shards = default_num_shards(len(uris))

        TokenizerBundle.load(ckpt)  # warm-up: imports and file caches favour neither side
        loop_walls, beam_walls, same = [], [], True
        for r in range(args.rounds):  # alternate the order: a loaded machine drifts
            def run_loop(r: int = r) -> dict:
                return plain_loop(uris, str(work / f"loop{r}"), ckpt, window_seconds, num_shards)

            def run_beam(r: int = r) -> dict:
                start = time.perf_counter()
                stats = run_tokenize([corpus], str(work / f"beam{r}"), ckpt, beam_args=beam_args, progress=False,
                                     window_seconds=window_seconds, num_shards=num_shards)
                return {**stats, "wall_seconds": time.perf_counter() - start}

            first, second = (run_loop, run_beam) if r % 2 == 0 else (run_beam, run_loop)
            a, b = first(), second()
            loop, beam = (a, b) if r % 2 == 0 else (b, a)
            loop_walls.append(loop["wall_seconds"])
            beam_walls.append(beam["wall_seconds"])
            same = same and sorted(p.read_bytes() for p in (work / f"loop{r}").glob("tokens-*.tar")) == sorted(
                p.read_bytes() for p in (work / f"beam{r}").glob("tokens-*.tar"))
        loop_wall, beam_wall = statistics.median(loop_walls), statistics.median(beam_walls)

    results = {
        "files": len(uris),
        "windows": loop["windows"],
        "audio_seconds": loop["audio_seconds"],
        "rounds": args.rounds,
        "loop_wall_seconds": round(loop_wall, 3),
        "beam_wall_seconds": round(beam_wall, 3),
        "loop_audio_s_per_s": round(loop["audio_seconds"] / loop_wall, 2),
        "beam_audio_s_per_s": round(beam["audio_seconds"] / beam_wall, 2),
        "beam_over_loop": round(beam_wall / loop_wall, 3),
        "identical_shards": same,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"{'median of ' + str(args.rounds) + ' round(s)':24}{'plain loop':>14}{'Beam job':>14}")
    print(f"{'wall seconds':24}{results['loop_wall_seconds']:>14.2f}{results['beam_wall_seconds']:>14.2f}")
    print(f"{'audio s / wall s':24}{results['loop_audio_s_per_s']:>14.2f}{results['beam_audio_s_per_s']:>14.2f}")
    print(f"Beam / loop wall time: {results['beam_over_loop']:.2f}x (target <= 1.2x); "
          f"{results['files']} files, {results['windows']} windows, shards byte-identical: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
