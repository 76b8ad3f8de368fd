"""The ``musiclm`` command line: one sub-command per step of the data flow.

    corpus demo → prepare (audio shards) → train tokenizers → fit (k-means, MuLan RVQ)
    → tokenize (token shards) → train stages → generate / serve;  demo runs them all.

Heavy libraries are imported inside each command so that ``musiclm --help`` is instant.
User mistakes (a missing folder, a checkpoint of another preset, a folder without shards) end
in one ``error:`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

STAGES = ("semantic", "coarse", "fine")
TOKENIZER_COMPONENTS = ("soundstream", "w2vbert", "mulan", "melody")


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'bad input', not 'bug'. Imported lazily: they live in heavy modules."""
    from musiclm.checkpoint import CheckpointError

    # ValueError: the library's own argument checks (a bad preset, workers < 0, ...); MUSICLM_DEBUG=1 keeps tracebacks
    errors: list[type[BaseException]] = [UserError, CheckpointError, FileNotFoundError, ValueError]
    try:
        from musiclm.audio import AudioError

        errors.append(AudioError)
    except ImportError:
        pass
    try:
        from musiclm.orchestration.ray_cluster import ClusterConnectionError

        errors.append(ClusterConnectionError)
    except ImportError:
        pass
    try:
        from musiclm.data.shards import ShardError

        errors.append(ShardError)
    except ImportError:
        pass
    return tuple(errors)


# ----------------------------------------------------------------------------- commands


def cmd_corpus(args: argparse.Namespace) -> int:
    if args.corpus_kind == "melody-demo":
        if args.melodies <= 0 or args.renditions < 2 or args.seconds <= 0:
            raise UserError("--melodies and --seconds must be positive and --renditions at least 2")
        from musiclm.data.melody_pairs import generate_melody_corpus, write_demo_hum

        stats = generate_melody_corpus(args.out_dir, melodies=args.melodies, renditions=args.renditions,
                                       seconds=args.seconds, seed=args.seed)
        hum = write_demo_hum(os.path.join(args.out_dir, "hum.wav"), seed=args.seed, seconds=args.seconds)
        print(f"wrote {stats['files']} recordings ({stats['melodies']} melodies x {stats['renditions']} renditions; "
              f"timbres {stats['timbres']}) and captions.jsonl (a pairs manifest: melody_group per row) to "
              f"{args.out_dir}, and a hum of {hum['melody_group']} to {hum['path']}")
        return 0
    if args.clips <= 0 or args.seconds <= 0:
        raise UserError("--clips and --seconds must be positive")
    from musiclm.data.demo_corpus import generate_corpus

    clips = generate_corpus(args.out_dir, clips=args.clips, seconds=args.seconds, seed=args.seed)
    print(f"wrote {len(clips)} clips of {args.seconds:g} s and captions.jsonl to {args.out_dir}")
    return 0


def cmd_prepare(args: argparse.Namespace, beam_args: list[str]) -> int:
    from musiclm.pipelines.prepare_audio import run_prepare_audio

    stats = run_prepare_audio(
        args.inputs, args.out, captions=args.captions, window_seconds=args.window_seconds, beam_args=beam_args
    )
    _print_job_stats(stats, args.out)
    return 0


def cmd_tokenize(args: argparse.Namespace, beam_args: list[str]) -> int:
    _require_dir(args.tokenizers, "--tokenizers")
    from musiclm.pipelines.tokenize import run_tokenize

    if args.window_seconds is not None and args.window_seconds <= 0:
        raise UserError("--window-seconds must be positive")
    stats = run_tokenize(args.inputs, args.out, args.tokenizers, captions=args.captions, beam_args=beam_args,
                         window_seconds=args.window_seconds)
    _print_job_stats(stats, args.out)
    return 0


def _print_job_stats(stats: dict, out: str) -> None:
    keys = ("files_in", "files_ok", "files_dead", "windows", "audio_seconds", "wall_seconds")
    summary = ", ".join(f"{k}={stats[k]:.4g}" if isinstance(stats.get(k), float) else f"{k}={stats.get(k)}" for k in keys if k in stats)
    print(f"done: {summary}; shards, manifest.json, dead_letter.jsonl and stats.json in {out}")


def cmd_train(args: argparse.Namespace) -> int:
    _require_dir(args.data, "--data")
    from musiclm.training import registry
    from musiclm.training.runner import train

    options = _parse_options(args.option)
    if args.precision is not None:
        if options.setdefault("precision", args.precision) != args.precision:
            raise UserError(f"--precision {args.precision} and --option precision={options['precision']} disagree")
    accepted = registry.accepted_options(args.component) - {"self", "preset", "device", "wrap_model"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UserError(f"{args.component} has no option {', '.join(unknown)}; its options are {', '.join(sorted(accepted))}")
    result = train(
        args.component,
        args.data,
        args.out,
        preset=args.preset,
        workers=args.workers,
        use_gpu=args.use_gpu,
        address=args.address,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        log_every=args.log_every,
        learner_options=options or None,
    )
    print(json.dumps(result, indent=2, default=str))
    return 0


def _parse_options(items: list[str] | None) -> dict:
    """``KEY=VALUE`` pairs; values are read as JSON where they parse (numbers, true/false), else as text."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option {item!r}: expected KEY=VALUE")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    return options


def cmd_fit(args: argparse.Namespace, beam_args: list[str]) -> int:
    _require_dir(args.data, "--data")
    _require_dir(args.tokenizers, "--tokenizers")
    from musiclm.training.fitting import fit_component

    for flag, value in (("--max-frames", args.max_frames), ("--max-windows", args.max_windows), ("--k", args.k)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be positive")
    out = fit_component(
        args.what, args.data, args.tokenizers, max_windows=args.max_windows, max_frames=args.max_frames,
        frames_per_window=args.frames_per_window, features_dir=args.features_dir, k=args.k, seed=args.seed,
        beam_args=beam_args, device=args.device,
    )
    print(f"wrote {out}")
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    if args.backends_action == "show":
        _require_dir(args.tokenizers, "--tokenizers")
    from musiclm.tokenizers.backends import describe_backends, set_backend

    if args.backends_action == "set":
        path = set_backend(args.tokenizers, args.role, args.backend, args.path, _parse_options(args.option) or None)
        print(f"wrote {path}")
    print(describe_backends(args.tokenizers))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _require_dir(args.tokenizers, "--tokenizers")
    _require_dir(args.data, "--data")
    if args.max_clips <= 0:
        raise UserError("--max-clips must be positive")
    out = args.out or os.path.join(args.tokenizers, "eval")
    if args.what == "mulan":
        from musiclm.evaluation.mulan import evaluate_mulan

        evaluate_mulan(args.tokenizers, args.data, out, max_clips=args.max_clips, device=args.device,
                       eval_fraction=args.eval_fraction, prompt=args.prompt)
        report = Path(out) / "mulan_eval.md"
    else:
        from musiclm.evaluation.codec import evaluate_codec

        evaluate_codec(args.tokenizers, args.data, out, max_clips=args.max_clips, device=args.device)
        report = Path(out) / "codec_eval.md"
    print(report.read_text())
    print(f"wrote {report} and its .json in {out}")
    return 0


def _generation_spec(args: argparse.Namespace, melody_tokens: Any = None, melody_contour: Any = None) -> Any:
    """The GenerationSpec of ``musiclm generate``'s flags (one prompt, or ``--story``)."""
    from musiclm.generation.spec import GenerationSpec, Segment, parse_story

    if args.story and args.prompt:
        raise UserError("give a prompt or --story, not both")
    if not args.story and not (args.prompt or "").strip():
        raise UserError("the prompt is empty (or give --story \"calm piano:15\" \"energetic techno:15\")")
    segments = parse_story(args.story) if args.story else (Segment(args.prompt, args.seconds),)
    temperatures = {k: v for k, v in (("semantic", args.t_semantic), ("coarse", args.t_coarse),
                                      ("fine", args.t_fine)) if v is not None}
    return GenerationSpec(segments=segments, seed=args.seed, num_samples=args.num_samples,
                          temperatures=temperatures or None, top_k=args.top_k, top_p=args.top_p,
                          guidance_scale=args.guidance_scale, melody_tokens=melody_tokens, rerank=args.rerank,
                          melody_contour=melody_contour,
                          pitch_guidance=args.pitch_guidance if melody_contour is not None else 0.0)


def _out_paths(out: str, n: int) -> list[str]:
    """``musiclm.wav`` for one sample; ``musiclm_0.wav``, ``musiclm_1.wav``, ... for several."""
    if n == 1:
        return [out]
    base, ext = os.path.splitext(out)
    return [f"{base}_{i}{ext or '.wav'}" for i in range(n)]


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    _require_dir(args.checkpoints, "--checkpoints")
    if args.seconds <= 0:
        raise UserError("--seconds must be positive")
    if args.report_melody and not args.melody:
        raise UserError("--report-melody needs --melody")
    if args.pitch_guidance and not args.melody:
        raise UserError("--pitch-guidance steers toward a melody: it needs --melody")
    from musiclm.audio import load_audio, write_wav
    from musiclm.constants import SAMPLE_RATE
    from musiclm.generation.cascade import Cascade, collect

    _generation_spec(args)  # refuse bad flags before loading any model
    melody_wav = melody_tokens = melody_contour = None
    if args.melody:
        from musiclm.tokenizers.contour import melody_contour as melody_contour_of
        from musiclm.tokenizers.melody import has_melody, melody_tokens_of

        if not os.path.isfile(args.melody):
            raise UserError(f"--melody {args.melody}: no such file")
        if not has_melody(args.checkpoints):
            raise UserError(f"{args.checkpoints} has no melody tokenizer (melody/ and melody_rvq/): "
                            "train it with `musiclm train melody` and `musiclm fit melody_rvq`")
        melody_wav = load_audio(args.melody)  # mono float32 at 24 kHz
        melody_tokens = melody_tokens_of(args.checkpoints, melody_wav)  # [Fm, Q]
        melody_contour = melody_contour_of(melody_wav)  # [F]: one pitch class per 40-ms frame
    spec = _generation_spec(args, melody_tokens, melody_contour)
    cascade = Cascade.load(args.checkpoints)
    if spec.pitch_guidance and (cascade.pitch_probe is None or not cascade.coarse.config.contour):
        raise UserError(f"--pitch-guidance needs a pitch probe ({args.checkpoints}/pitch_probe: `musiclm train "
                        "pitch_probe`) and a coarse stage trained with the contour (--option contour=true)")
    if melody_tokens is not None and not cascade.semantic.config.melody_codebooks:
        raise UserError("these stages were trained without melody conditioning: train them on shards with "
                        "melody tokens (--option melody=true), or leave out --melody")

    def progress(done: float, wall: float) -> None:
        print(f"\r{done:6.1f} / {spec.seconds:g} s of audio ({wall:6.1f} s)", end="", flush=True)

    result = collect(cascade.stream(spec), progress)  # chunks [N, T_i] as each window finishes
    print()
    audio = result.audio  # [N, T]
    seconds = audio.shape[1] / SAMPLE_RATE
    for path, wav in zip(_out_paths(args.out, len(audio)), audio):
        write_wav(path, wav, SAMPLE_RATE)
        print(f"wrote {path}")
    print(f"{len(audio)} x {seconds:.2f} s of audio in {result.elapsed_s:.2f} s (real-time factor "
          f"{result.real_time_factor:.2f}; first audio after {result.first_audio_s:.2f} s)")
    if args.report_melody:
        from dataclasses import replace

        from musiclm.evaluation.melody import melody_adherence

        plain = cascade.generate_spec(replace(spec, melody_tokens=None, melody_contour=None,
                                              pitch_guidance=0.0))  # the same request without the melody
        with_melody = [melody_adherence(melody_wav, wav) for wav in audio]
        without = [melody_adherence(melody_wav, wav) for wav in plain]
        print(f"melody adherence (chroma similarity to {args.melody}, 1 = same melody): "
              f"{np.mean(with_melody):.3f} with the melody, {np.mean(without):.3f} without it")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from musiclm.orchestration.serve import ServeConfig, run_server

    if args.config and not os.path.isfile(args.config):
        raise UserError(f"--config {args.config}: no such file")
    config = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    given = {key: getattr(args, key) for key in ("checkpoints", "host", "port", "max_seconds", "address")
             if getattr(args, key) is not None}
    config = replace(config, **given)  # flags win over the YAML
    _require_dir(config.checkpoints, "--checkpoints (or checkpoints: in --config)")
    run_server(config, blocking=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from musiclm.orchestration.demo import DemoConfig, run_demo

    config = DemoConfig(workdir=Path(args.workdir), clips=args.clips, seconds=args.seconds, seed=args.seed)
    report = run_demo(config)
    print(f"report: {report}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from musiclm.orchestration.describe import describe, format_description

    info = describe(args.preset)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def _require_dir(path: str, flag: str) -> None:
    if "://" in str(path):
        return  # remote URLs are checked by the job that opens them
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such folder")


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musiclm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    corpus = sub.add_parser("corpus", help="make a corpus (a procedural demo corpus)")
    corpus_sub = corpus.add_subparsers(dest="corpus_kind", required=True, metavar="KIND")
    demo_corpus = corpus_sub.add_parser("demo", help="deterministic procedural music with captions")
    demo_corpus.add_argument("out_dir")
    demo_corpus.add_argument("--clips", type=int, default=200)
    demo_corpus.add_argument("--seconds", type=float, default=10.0)
    demo_corpus.add_argument("--seed", type=int, default=0)
    melody_corpus = corpus_sub.add_parser(
        "melody-demo", help="melody pairs: each melody in several renditions (instrument, key, tempo, hum, whistle)")
    melody_corpus.add_argument("out_dir")
    melody_corpus.add_argument("--melodies", type=int, default=16)
    melody_corpus.add_argument("--renditions", type=int, default=4)
    melody_corpus.add_argument("--seconds", type=float, default=10.0)
    melody_corpus.add_argument("--seed", type=int, default=0)

    beam_help = "any further options (--runner DataflowRunner --project ... ) go to Beam unchanged"
    prepare = sub.add_parser("prepare", help="Beam job: crop and resample audio into FLAC audio shards", epilog=beam_help)
    prepare.add_argument("inputs", nargs="+", help="files, folders or globs; local or any fsspec URL")
    prepare.add_argument("--out", required=True)
    prepare.add_argument("--captions", help="captions.jsonl or a MusicCaps CSV")
    prepare.add_argument("--window-seconds", type=float, default=10.0)

    tokenize = sub.add_parser("tokenize", help="Beam job: audio → acoustic, semantic and MuLan token shards", epilog=beam_help)
    tokenize.add_argument("inputs", nargs="+", help="files, folders or globs; local or any fsspec URL")
    tokenize.add_argument("--out", required=True)
    tokenize.add_argument("--tokenizers", required=True, help="checkpoint folder holding the trained tokenizers")
    tokenize.add_argument("--captions", help="captions.jsonl or a MusicCaps CSV")
    tokenize.add_argument("--window-seconds", type=float, default=None,
                          help="crop window (default: the semantic stage's training crop of the tokenizers' preset)")

    train = sub.add_parser("train", help="train a tokenizer or a stage with Ray Train")
    train.add_argument("component", choices=[*TOKENIZER_COMPONENTS, *STAGES, "pitch_probe"])
    train.add_argument("--data", required=True, help="audio shards (tokenizers) or token shards (stages)")
    train.add_argument("--out", required=True, help="checkpoint folder of this component")
    train.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    train.add_argument("--workers", type=int, default=1)
    train.add_argument("--use-gpu", action="store_true")
    train.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--log-every", type=int, default=10)
    train.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                       help="stages: bf16 runs the forward under torch.autocast with bfloat16 (loss, weights and "
                            "optimizer states stay fp32; for GPUs with bf16, e.g. A100/H100); default fp32")
    train.add_argument("--option", action="append", metavar="KEY=VALUE",
                       help="a learner option, e.g. --option text_trainable=true (repeatable)")

    fit = sub.add_parser("fit", help="fit the semantic k-means, MuLan's RVQ or the melody RVQ on audio shards",
                         epilog=beam_help)
    fit.add_argument("what", choices=["semantic_kmeans", "mulan_rvq", "melody_rvq"])
    fit.add_argument("--data", required=True, help="audio shards")
    fit.add_argument("--tokenizers", required=True, help="checkpoint folder with w2vbert/, mulan/ (and melody/ for melody_rvq)")
    fit.add_argument("--max-windows", type=int, default=2000, help="mulan_rvq / melody_rvq: audio windows (melody embeddings) to fit on")
    fit.add_argument("--max-frames", type=int, default=1_000_000,
                     help="semantic_kmeans: feature frames sampled across the whole corpus (a Beam job)")
    fit.add_argument("--frames-per-window", type=int, default=None, help="semantic_kmeans: cap per audio window")
    fit.add_argument("--features-dir", help="where the sampled features go (default TOKENIZERS/semantic_kmeans/features; "
                     "a rerun resumes)")
    fit.add_argument("--k", type=int, default=1024, help="semantic_kmeans: centroids")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default="cpu")

    evaluate = sub.add_parser("eval", help="evaluate a tokenizer on held-out audio shards")
    eval_sub = evaluate.add_subparsers(dest="what", required=True, metavar="WHAT")
    for what, text in (
        ("codec", "acoustic codec: SI-SNR, multi-scale mel distance and bitrate, side by side with Opus"),
        ("mulan", "conditioner: text↔audio retrieval R@1/5/10 and zero-shot tagging over the aspects"),
    ):
        p = eval_sub.add_parser(what, help=text)
        p.add_argument("--tokenizers", required=True, help="tokenizer checkpoint folder (backends.json is honoured)")
        p.add_argument("--data", required=True, help="audio shards (the held-out split is used)")
        p.add_argument("--out", help="report folder (default: TOKENIZERS/eval)")
        p.add_argument("--max-clips", type=int, default=256 if what == "mulan" else 16)
        p.add_argument("--device", default="cpu")
        if what == "mulan":
            p.add_argument("--eval-fraction", type=float, default=None,
                           help="held-out fraction (default: the trainer's)")
            p.add_argument("--prompt", default="{aspect}", help="zero-shot tagging prompt template")

    backends = sub.add_parser(
        "backends", help="choose the model behind each kind of token: ours or a pretrained one from a local folder"
    )
    backends_sub = backends.add_subparsers(dest="backends_action", required=True, metavar="ACTION")
    show = backends_sub.add_parser("show", help="which backend makes each kind of token, and the token rates")
    show.add_argument("--tokenizers", required=True, help="tokenizer checkpoint folder")
    use = backends_sub.add_parser(
        "set",
        help="use a backend for a role (loads it once to check)",
        epilog="roles and backends: acoustic soundstream|encodec; semantic w2vbert|hubert|w2v-bert-2.0; "
        "conditioner mulan|clap. Naming ours (soundstream, w2vbert, mulan) resets the role.",
    )
    use.add_argument("role", choices=["acoustic", "semantic", "conditioner"])
    use.add_argument("backend")
    use.add_argument("path", nargs="?", help="local folder of the pretrained model (transformers' save_pretrained)")
    use.add_argument("--tokenizers", required=True, help="tokenizer checkpoint folder (backends.json goes there)")
    use.add_argument("--option", action="append", metavar="KEY=VALUE",
                     help="backend option, e.g. bandwidth=6.0 (encodec), layer=6 (hubert) (repeatable)")

    generate = sub.add_parser("generate", help="text → music with the trained cascade")
    generate.add_argument("prompt", nargs="?", help="what the music should be (or --story)")
    generate.add_argument("--checkpoints", required=True)
    generate.add_argument("--seconds", type=float, default=10.0, help="length (any, e.g. 300 for 5 minutes)")
    generate.add_argument("--story", nargs="+", metavar="PROMPT:SECONDS",
                          help='story mode: --story "calm piano:15" "energetic techno:15"')
    generate.add_argument("--melody", metavar="WAV", help="a hummed / whistled / played melody to follow")
    generate.add_argument("--report-melody", action="store_true",
                          help="also generate without the melody and print both melody-adherence scores")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--num-samples", type=int, default=1, help="samples in one batch (out_0.wav, ...)")
    generate.add_argument("--rerank", action="store_true", help="order the samples by MuLan text-audio score")
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--guidance-scale", type=float, default=1.0,
                          help="classifier-free guidance (1 = none; > 1 follows the prompt more closely)")
    generate.add_argument("--pitch-guidance", type=float, default=0.0,
                          help="with --melody: steer the coarse stage toward the melody's pitch with the pitch probe "
                               "(checkpoints/pitch_probe; 0 = off, the demo uses 10)")
    generate.add_argument("--out", default="musiclm.wav")
    generate.add_argument("--t-semantic", type=float)
    generate.add_argument("--t-coarse", type=float)
    generate.add_argument("--t-fine", type=float)

    serve = sub.add_parser("serve", help="host the cascade with Ray Serve over HTTP (a web page at /)")
    serve.add_argument("--config", help="YAML: replicas, CPU/GPU fractions, autoscaling, batching and limits "
                                        "per deployment (see examples/serve.yaml); flags below override it")
    serve.add_argument("--checkpoints")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--max-seconds", type=float, help="longest request (default 300)")
    serve.add_argument("--address", help="deploy to this Ray cluster, e.g. ray://head:10001 (default: a local Ray)")

    demo = sub.add_parser("demo", help="the whole pipeline once on a generated corpus, with a report")
    demo.add_argument("--workdir", default="musiclm-demo")
    demo.add_argument("--clips", type=int, default=None, help="clips in the training corpus")
    demo.add_argument("--seconds", type=float, default=10.0)
    demo.add_argument("--seed", type=int, default=0)

    describe = sub.add_parser("describe", help="configuration, parameter counts and token rates of a preset")
    describe.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    describe.add_argument("--json", action="store_true")
    return parser


BEAM_COMMANDS = {"prepare", "tokenize", "fit"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in BEAM_COMMANDS:
        args, beam_args = parser.parse_known_args(argv)
    else:
        args, beam_args = parser.parse_args(argv), []
    handlers = {
        "corpus": cmd_corpus,
        "prepare": lambda a: cmd_prepare(a, beam_args),
        "tokenize": lambda a: cmd_tokenize(a, beam_args),
        "train": cmd_train,
        "fit": lambda a: cmd_fit(a, beam_args),
        "backends": cmd_backends,
        "eval": cmd_eval,
        "generate": cmd_generate,
        "serve": cmd_serve,
        "demo": cmd_demo,
        "describe": cmd_describe,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user errors become one line, bugs keep their traceback
        if isinstance(exc, _user_errors()) and not os.environ.get("MUSICLM_DEBUG"):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
