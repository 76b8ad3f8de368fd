"""``musiclm demo``: the whole system once, on this machine, with a report.

corpus + melody pairs → audio shards (Beam) → SoundStream, w2v-BERT, MuLan, melody embedder (Ray Train)
→ k-means, MuLan RVQ, melody RVQ → token shards with melody tokens (Beam) → semantic, coarse, fine stages
with melody conditioning (Ray Train) → Ray Serve → POST /generate → WAV + spectrogram; a hummed melody
followed (adherence with and without it) and a two-prompt story (spectral flux at the joins, tempo)
→ report. Every step runs the same public function its CLI command runs, so
the working folder can be reused by each command afterwards. A step whose output already exists is
skipped (the demo resumes after an interruption).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DemoConfig:
    workdir: Path = Path("musiclm-demo")
    clips: int | None = None  # training clips; None = the preset's default
    heldout_clips: int = 16
    seconds: float = 10.0
    seed: int = 0
    preset: str = "tiny"
    prompt: str = "an upbeat techno track with a pulsing synth bass and a four-on-the-floor kick"
    generate_seconds: float = 10.0
    melodies: int = 24  # melody groups of the pairs corpus the melody embedder trains on ...
    renditions: int = 4  # ... each rendered this many times (instrument, key of accompaniment, tempo, hum, whistle)
    story: tuple[tuple[str, float], ...] = (("calm solo piano, slow and gentle", 10.0),
                                             ("energetic techno with a pounding kick", 10.0))
    # training steps per component: the whole demo measured 11.3 min on 2 cores with 300/200/150/150/120/80 steps;
    # these (≈ +4 min) keep it well inside 20 minutes
    steps: dict[str, int] = field(
        default_factory=lambda: {
            "soundstream": 400,
            "w2vbert": 200,
            "mulan": 150,
            "melody": 120,
            "semantic": 250,
            "coarse": 300,
            "fine": 140,
            "pitch_probe": 1000,  # ≈ 30 s: a few MLPs over the codec's latent
        }
    )
    melody_samples: int = 4  # rows generated per melody condition (with the hum, steered, without it)
    pitch_guidance: float = 10.0  # the pitch probe's weight in the steered row (benchmarks/bench_pitch_guidance.py)
    # the coarse stage's targets are the codec's least predictable tokens: 4 crops a step (the tiny
    # default is 2) took its held-out cross-entropy from 6.45 to 5.95 nats (unigram 6.51) in 800 steps
    batch_size: dict[str, int] = field(default_factory=lambda: {"coarse": 4})
    default_clips: int = 120

    @property
    def n_clips(self) -> int:
        return self.clips if self.clips is not None else self.default_clips


class Timer:
    """Wall time per demo step, printed as each step starts and ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 1)
        print(f"=== {name}: {self.seconds[name]:.1f} s ===", flush=True)


def _done(path: Path) -> bool:
    return path.exists()


def run_demo(config: DemoConfig) -> Path:
    """Run every step, write ``report.md`` / ``report.json`` in the working folder and return the report path."""
    import numpy as np
    import torch

    from musiclm.data.demo_corpus import generate_corpus
    from musiclm.data.melody_pairs import generate_melody_corpus, write_demo_hum
    from musiclm.pipelines.prepare_audio import run_prepare_audio
    from musiclm.pipelines.tokenize import run_tokenize
    from musiclm.training.fitting import fit_component
    from musiclm.training.runner import train

    work = config.workdir.resolve()
    corpus, heldout = work / "corpus", work / "heldout"
    shards, ckpt = work / "shards", work / "checkpoints"
    work.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    results: dict[str, Any] = {"config": {"clips": config.n_clips, "heldout_clips": config.heldout_clips,
                                          "seconds": config.seconds, "seed": config.seed, "preset": config.preset}}

    melody_corpus, hum = work / "melody-corpus", work / "hum.wav"
    with timer.step("corpus"):
        if not _done(corpus / "captions.jsonl"):
            generate_corpus(corpus, clips=config.n_clips, seconds=config.seconds, seed=config.seed)
        if not _done(heldout / "captions.jsonl"):
            # another seed: none of these clips is seen by any training step
            generate_corpus(heldout, clips=config.heldout_clips, seconds=config.seconds, seed=config.seed + 10_000)
        if not _done(melody_corpus / "captions.jsonl"):
            generate_melody_corpus(str(melody_corpus), melodies=config.melodies, renditions=config.renditions,
                                   seconds=config.seconds, seed=config.seed)
        if not _done(hum):
            # a melody of another seed: the demo follows a tune it never trained on
            write_demo_hum(str(hum), seed=config.seed + 20_000, seconds=config.generate_seconds)

    with timer.step("prepare audio shards (Beam)"):
        if not _done(shards / "audio" / "manifest.json"):
            results["prepare_audio"] = run_prepare_audio(
                [str(corpus / "audio")], str(shards / "audio"), captions=str(corpus / "captions.jsonl"),
                window_seconds=config.seconds,
            )
        if not _done(shards / "melody-audio" / "manifest.json"):
            results["prepare_melody_audio"] = run_prepare_audio(
                [str(melody_corpus / "audio")], str(shards / "melody-audio"),
                captions=str(melody_corpus / "captions.jsonl"), window_seconds=config.seconds,
            )

    def train_component(name: str, data: Path, **options: Any) -> None:
        with timer.step(f"train {name} (Ray Train)"):
            results.setdefault("training", {})[name] = train(
                name, str(data), str(ckpt / name), preset=config.preset, workers=1,
                max_steps=config.steps[name], batch_size=config.batch_size.get(name), log_every=20,
                learner_options=options or None,
            )

    for name in ("soundstream", "w2vbert", "mulan"):
        train_component(name, shards / "audio")
    train_component("melody", shards / "melody-audio")

    for name, data in (("semantic_kmeans", "audio"), ("mulan_rvq", "audio"), ("melody_rvq", "melody-audio")):
        with timer.step(f"fit {name}"):
            fit_component(name, str(shards / data), str(ckpt))

    with timer.step("tokenize corpus (Beam)"):
        results["tokenize"] = run_tokenize([str(corpus / "audio")], str(shards / "tokens"), str(ckpt),
                                           captions=str(corpus / "captions.jsonl"))
        results["tokenize_heldout"] = run_tokenize([str(heldout / "audio")], str(shards / "heldout-tokens"),
                                                   str(ckpt), captions=str(heldout / "captions.jsonl"))

    for name in ("semantic", "coarse", "fine"):
        options: dict[str, Any] = {"melody": True}
        if name == "coarse":  # the coarse stage draws the pitch: it also takes the melody contour, frame by frame
            options["contour"] = True
        if name != "semantic":  # acoustic ids start from the codec's code vectors (training/code_embeddings.py)
            options["codec_init"] = str(ckpt)
        train_component(name, shards / "tokens", **options)
    # which pitch class a coarse frame plays, read from the codec's latent: steers generation toward a melody
    train_component("pitch_probe", shards / "tokens", codec_init=str(ckpt))

    with timer.step("serve (Ray Serve) and POST /generate"):
        results["serve"] = _serve_and_request(config, ckpt, work)

    with timer.step("melody conditioning and story mode (in-process cascade)"):
        results["melody"], results["story"] = _melody_and_story(config, ckpt, hum, work)

    with timer.step("evaluate on held-out clips"):
        results["learning"] = _evaluate(ckpt, heldout, shards, work, np=np, torch=torch)
        results["learning"]["melody"] = _melody_retrieval(config, ckpt, work)

    results["timings_seconds"] = timer.seconds
    results["total_seconds"] = round(sum(timer.seconds.values()), 1)
    _plots(ckpt, work)
    (work / "report.json").write_text(json.dumps(results, indent=2, default=str))
    report = work / "report.md"
    report.write_text(_report_markdown(results, work))
    print(report.read_text())
    return report


def _serve_and_request(config: DemoConfig, ckpt: Path, work: Path) -> dict[str, Any]:
    import socket

    import httpx
    from ray import serve

    from musiclm.orchestration.serve import ServeConfig, run_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_config = ServeConfig(checkpoints=str(ckpt), host="127.0.0.1", port=port, access_log=False)
    start = time.perf_counter()
    run_server(serve_config, blocking=False)
    startup = time.perf_counter() - start
    try:
        url = f"http://127.0.0.1:{port}"
        health = httpx.get(f"{url}/health", timeout=60).json()
        start = time.perf_counter()
        response = httpx.post(
            f"{url}/generate",
            json={"prompt": config.prompt, "seconds": config.generate_seconds, "seed": config.seed},
            timeout=600,
        )
        latency = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"POST /generate answered {response.status_code}: {response.text[:500]}")
        wav_path = work / "generated.wav"
        wav_path.write_bytes(response.content)
        bad = httpx.post(f"{url}/generate", json={"prompt": "", "seconds": 10}, timeout=60)
    finally:
        serve.shutdown()
    _spectrogram(wav_path, work / "generated.png", title=config.prompt)
    return {
        "url": url, "startup_seconds": round(startup, 1), "health": health,
        "request_seconds": round(latency, 2), "audio_seconds": config.generate_seconds,
        "real_time_factor": round(latency / config.generate_seconds, 3),
        "wav": str(wav_path), "spectrogram": str(work / "generated.png"),
        "bad_request_status": bad.status_code, "bad_request_body": bad.json(),
    }


def _melody_and_story(config: DemoConfig, ckpt: Path, hum: Path, work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """What ``musiclm generate --melody hum.wav --report-melody`` and ``--story`` measure: melody adherence
    with and without the hum (same prompt and seed), and the continuity of a two-prompt story."""
    from dataclasses import replace

    import numpy as np

    from musiclm.audio import load_audio, write_wav
    from musiclm.constants import SAMPLE_RATE
    from musiclm.evaluation.continuity import spectral_flux_at_joins, tempo_bpm
    from musiclm.evaluation.melody import adherence_report
    from musiclm.generation.cascade import Cascade, collect
    from musiclm.generation.plan import join_seconds
    from musiclm.generation.spec import GenerationSpec, Segment
    from musiclm.tokenizers.contour import melody_contour
    from musiclm.tokenizers.melody import melody_tokens_of

    cascade = Cascade.load(ckpt)
    hum_wav = load_audio(str(hum))
    melody_tokens = melody_tokens_of(ckpt, hum_wav)  # [Fm, Q]
    spec = GenerationSpec.single(config.prompt, config.generate_seconds, seed=config.seed,
                                 num_samples=config.melody_samples, melody_tokens=melody_tokens,
                                 melody_contour=melody_contour(hum_wav))
    start = time.perf_counter()
    conditioned = cascade.generate_spec(spec)  # [N, T]: the stages alone, given the melody
    melody_seconds = time.perf_counter() - start
    outputs = {"conditioned": conditioned}
    if cascade.pitch_probe is not None:  # ... and steered toward its pitch by the probe
        outputs["steered"] = cascade.generate_spec(replace(spec, pitch_guidance=config.pitch_guidance))
    outputs["unconditioned"] = cascade.generate_spec(replace(spec, melody_tokens=None, melody_contour=None))
    best = outputs.get("steered", conditioned)
    write_wav(str(work / "generated_melody.wav"), best[0], SAMPLE_RATE)
    per_row = [adherence_report(hum_wav, dict(zip(outputs, rows))) for rows in zip(*outputs.values())]
    melody = {
        "hum": str(hum), "samples": len(per_row), "generation_seconds": round(melody_seconds, 1),
        "pitch_guidance": config.pitch_guidance if "steered" in outputs else None,
        **{name: round(float(np.mean([r["scores"][name] for r in per_row])), 4) for name in outputs},
        "per_sample": per_row, "wav": str(work / "generated_melody.wav"),
    }

    story = GenerationSpec(segments=tuple(Segment(p, s) for p, s in config.story), seed=config.seed)
    streamed = collect(cascade.stream(story))
    wav = streamed.audio[0]
    write_wav(str(work / "story.wav"), wav, SAMPLE_RATE)
    _spectrogram(work / "story.wav", work / "story.png", title=" → ".join(p for p, _ in config.story))
    joins = join_seconds(story, cascade.configs)
    edges = np.cumsum([0.0] + [s for _, s in config.story])
    def measured(fn, *args):  # a piece too short for a measure reports why instead of failing the demo
        try:
            return fn(*args)
        except ValueError as exc:
            return {"skipped": str(exc)}

    flux = {stage: measured(spectral_flux_at_joins, wav, [t for t in times if 0 < t < story.seconds])
            for stage, times in joins.items() if any(0 < t < story.seconds for t in times)}
    return melody, {
        "segments": [list(s) for s in config.story], "audio_seconds": round(len(wav) / SAMPLE_RATE, 2),
        "generation_seconds": round(streamed.elapsed_s, 1), "real_time_factor": round(streamed.real_time_factor, 2),
        "first_audio_seconds": round(streamed.first_audio_s, 2), "chunks": streamed.chunks,
        "tempo_bpm": [round(t, 1) if isinstance(t, float) else None
                      for t in (measured(tempo_bpm, wav[int(a * SAMPLE_RATE): int(b * SAMPLE_RATE)])
                                for a, b in zip(edges[:-1], edges[1:]))],
        "spectral_flux_at_joins": flux, "wav": str(work / "story.wav"), "spectrogram": str(work / "story.png"),
    }


def _evaluate(ckpt: Path, heldout: Path, shards: Path, work: Path, *, np, torch) -> dict[str, Any]:
    """Held-out learning figures: each component against its baseline, plus the two tokenizer evaluations
    a user would run (``musiclm eval codec`` against Opus, ``musiclm eval mulan`` retrieval and tagging)."""
    from musiclm.audio import load_audio
    from musiclm.data.captions import load_captions
    from musiclm.data.shards import iter_samples
    from musiclm.evaluation.codec import evaluate_codec
    from musiclm.evaluation.learning import codec_quality, stage_cross_entropy
    from musiclm.evaluation.mulan import evaluate_mulan
    from musiclm.pipelines.prepare_audio import run_prepare_audio

    captions = load_captions(str(heldout / "captions.jsonl"))
    ids = sorted(captions)
    wavs = torch.from_numpy(np.stack([load_audio(str(heldout / "audio" / f"{i}.wav")) for i in ids]))  # [N, T]
    learning: dict[str, Any] = {}
    learning["codec"] = codec_quality(ckpt / "soundstream", wavs[:, : 24000 * 4])
    learning["codec_eval"] = evaluate_codec(ckpt, str(heldout / "audio"), work / "eval", max_clips=len(ids), seconds=4.0)
    if not (shards / "heldout-audio" / "manifest.json").exists():
        run_prepare_audio([str(heldout / "audio")], str(shards / "heldout-audio"),
                          captions=str(heldout / "captions.jsonl"), window_seconds=wavs.shape[1] / 24000)
    # every clip of this corpus is held out (another seed), so the whole of it is the eval split
    learning["mulan_eval"] = evaluate_mulan(ckpt, str(shards / "heldout-audio"), work / "eval", eval_fraction=1.0)

    def samples(folder: Path) -> Callable[[], Any]:
        return lambda: iter_samples(str(folder), split_by_node=False, split_by_worker=False)

    for stage in ("semantic", "coarse", "fine"):
        learning[stage] = stage_cross_entropy(ckpt / stage, samples(shards / "heldout-tokens")(),
                                              samples(shards / "tokens")())
    return learning


def _melody_retrieval(config: DemoConfig, ckpt: Path, work: Path) -> dict[str, Any]:
    """Same-melody retrieval of the melody embedder on melodies it never trained on (another seed), each in
    ``config.renditions`` renditions: the first 4-s window of every recording, nearest neighbour by cosine."""
    import numpy as np
    import torch

    from musiclm.audio import load_audio
    from musiclm.data.captions import jsonl_records
    from musiclm.data.melody_pairs import generate_melody_corpus
    from musiclm.tokenizers.melody import load_melody
    from musiclm.training.melody_learner import retrieval_metrics

    folder = work / "heldout-melodies"
    if not _done(folder / "captions.jsonl"):
        generate_melody_corpus(str(folder), melodies=max(2, config.melodies // 3), renditions=config.renditions,
                               seconds=config.seconds, seed=config.seed + 30_000)
    rows = [row for _, row in jsonl_records((folder / "captions.jsonl").read_text(), str(folder))]
    groups = sorted({row["melody_group"] for row in rows})
    embedder = load_melody(ckpt / "melody").eval()
    window = embedder.config.window_samples
    wavs = torch.from_numpy(np.stack([load_audio(str(folder / row["file"]))[:window] for row in rows]))
    with torch.inference_mode():
        emb = embedder.embed_windows(wavs)  # [N, 192]
    ids = torch.tensor([groups.index(row["melody_group"]) for row in rows])
    return {"melodies": len(groups), "recordings": len(rows), **retrieval_metrics(emb, ids)}


def _spectrogram(wav_path: Path, png_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import soundfile as sf

    wav, sr = sf.read(str(wav_path), dtype="float32")
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.specgram(wav + 1e-9 * np.random.default_rng(0).standard_normal(len(wav)), NFFT=1024, Fs=sr, noverlap=768,
                cmap="magma")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (Hz)")
    ax.set_title(title[:90], fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _plots(ckpt: Path, work: Path) -> None:
    from musiclm.training.metrics import plot_losses

    for folder in sorted(p for p in ckpt.iterdir() if (p / "metrics.jsonl").exists()):
        plot_losses(str(folder), str(work / f"loss_{folder.name}.png"))


def _report_markdown(results: dict[str, Any], work: Path) -> str:
    learning = results.get("learning", {})
    lines = ["# musiclm demo report", ""]
    cfg = results["config"]
    lines += [f"Corpus: {cfg['clips']} training clips and {cfg['heldout_clips']} held-out clips of {cfg['seconds']:g} s "
              f"(seed {cfg['seed']}), preset `{cfg['preset']}`. Total wall time {results['total_seconds']:.0f} s.", ""]
    lines += ["## Did it learn? (held-out clips)", "", "| component | measure | trained | baseline |", "|---|---|---|---|"]
    if "codec" in learning:
        c = learning["codec"]
        lines.append(f"| SoundStream | multi-scale mel distance (lower is better) | {c['trained_mel_distance']:.3f} | "
                     f"{c['untrained_mel_distance']:.3f} (untrained) |")
        lines.append(f"| SoundStream | SI-SNR dB (higher is better) | {c['trained_si_snr_db']:.2f} | "
                     f"{c['untrained_si_snr_db']:.2f} (untrained) |")
    if "codec_eval" in learning:
        full = learning["codec_eval"]["rows"][-1]
        if full.get("opus_si_snr_db") is not None:
            lines.append(f"| SoundStream vs Opus at {full['kbps']:g} kbps | SI-SNR dB | {full['si_snr_db']:.2f} | "
                         f"{full['opus_si_snr_db']:.2f} (Opus) |")
            lines.append(f"| SoundStream vs Opus at {full['kbps']:g} kbps | mel distance | {full['mel_distance']:.3f} | "
                         f"{full['opus_mel_distance']:.3f} (Opus) |")
    if "mulan_eval" in learning:
        m = learning["mulan_eval"]
        for direction, label in (("text_to_audio", "text→audio"), ("audio_to_text", "audio→text")):
            r = m[direction]
            lines.append(f"| MuLan | {label} R@1 / R@5 / R@10 among {m['clips']} clips | "
                         f"{r['r1']:.3f} / {r['r5']:.3f} / {r['r10']:.3f} | "
                         f"{r['chance_r1']:.3f} / {r['chance_r5']:.3f} / {r['chance_r10']:.3f} (chance) |")
        tag = m.get("tagging", {})
        if tag.get("aspects_evaluated"):
            lines.append(f"| MuLan | zero-shot tagging mAP over {tag['aspects_evaluated']} aspects | {tag['map']:.3f} | "
                         f"{tag['chance_map']:.3f} (chance) |")
    for stage in ("semantic", "coarse", "fine"):
        if stage in learning:
            s = learning[stage]
            lines.append(f"| {stage} stage | cross-entropy nats/token | {s['cross_entropy']:.3f} | "
                         f"{s['unigram_cross_entropy']:.3f} (unigram), {s['uniform_cross_entropy']:.3f} (uniform) |")
    melody_eval = learning.get("melody") or {}
    if "r1" in melody_eval:
        lines.append(f"| melody embedder | same-melody R@1, {melody_eval['melodies']} unseen melodies × "
                     f"{melody_eval['recordings'] // melody_eval['melodies']} renditions | {melody_eval['r1']:.3f} | "
                     f"{melody_eval['chance_r1']:.3f} (chance) |")
    melody = results.get("melody")
    if melody:
        lines += ["", "## Melody conditioning", "",
                  f"The same prompt and seeds ({melody['samples']} samples), generated with and without the hum "
                  f"`{melody['hum']}` (a tune the melody embedder never trained on; its melody tokens, and its contour "
                  f"for the coarse stage): melody adherence (chroma of the "
                  f"predominant pitch, aligned, 0 = chance, 1 = the same melody) **{melody['conditioned']:.3f} with the "
                  f"melody, {melody['unconditioned']:.3f} without it**" + (
                      f"; with the melody and pitch guidance {melody['pitch_guidance']:g} (the pitch probe steering the "
                      f"coarse stage) **{melody['steered']:.3f}**" if "steered" in melody else "")
                  + f". Audio: `{melody['wav']}`."]
    story = results.get("story")
    if story:
        flux = "; ".join(f"{stage} joins {v['joins']:.3g} vs elsewhere {v['elsewhere']:.3g} (ratio {v['ratio']:.2f})"
                         if "ratio" in v else f"{stage}: not measured ({v['skipped']})"
                         for stage, v in story["spectral_flux_at_joins"].items()) or "no joins"
        lines += ["", "## Story mode", "",
                  f"{' → '.join(f'{p} ({s:g} s)' for p, s in story['segments'])}: {story['audio_seconds']:g} s in "
                  f"{story['generation_seconds']:g} s (real-time factor {story['real_time_factor']}), first audio after "
                  f"{story['first_audio_seconds']} s, {story['chunks']} chunks. Tempo per segment (bpm): "
                  f"{', '.join('n/a' if t is None else f'{t:g}' for t in story['tempo_bpm'])}. Spectral flux at window joins: {flux} "
                  f"(a click would give a ratio well above 1). Audio `{story['wav']}`, spectrogram `{story['spectrogram']}`."]
    lines += ["", "## Timings (wall seconds)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["timings_seconds"].items()]
    serve = results.get("serve", {})
    if serve:
        lines += ["", "## Serving", "",
                  f"Ray Serve started in {serve['startup_seconds']} s; POST /generate of {serve['audio_seconds']:g} s of audio "
                  f"took {serve['request_seconds']} s (real-time factor {serve['real_time_factor']}). An empty prompt answered "
                  f"{serve['bad_request_status']}: `{json.dumps(serve['bad_request_body'])}`.", ""]
    lines += ["## Where everything is", "",
              f"- generated audio: `{work / 'generated.wav'}`, spectrogram `{work / 'generated.png'}`",
              f"- checkpoints (one folder per component): `{work / 'checkpoints'}`",
              f"- shards: `{work / 'shards'}` (audio/, tokens/, heldout-tokens/; manifest, dead letters and stats beside them)",
              f"- tokenizer evaluations: `{work / 'eval'}` (codec_eval.md with codec_spectrograms.png, mulan_eval.md)",
              f"- loss curves: `{work}/loss_*.png`; metrics per step in each checkpoint's `metrics.jsonl`",
              f"- everything above as JSON: `{work / 'report.json'}`", ""]
    return "\n".join(lines)
