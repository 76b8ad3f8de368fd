"""``musiclm eval codec``: how well the acoustic tokenizer reconstructs held-out audio, at every bitrate
it serves, side by side with Opus at the same bitrate.

For each number of RVQ levels ``K`` (SoundStream's quantizer dropout makes one model serve 1..12) the
codec encodes each clip, decodes the first ``K`` levels and is scored against the original:

* SI-SNR (dB, higher is better; scale-invariant, phase-sensitive),
* multi-scale mel distance (mean |log-mel difference| over windows 2^6 .. 2^11, lower is better),
* bitrate ``K x log2(codebook_size) x frame_rate / 1000`` kbps (12 x 10 bits x 50 Hz = 6 kbps).

Opus runs through ``ffmpeg -c:a libopus`` (24 kHz mono) at the same nominal bitrate where Opus can:
libopus' lowest bitrate is 6 kbps, so lower codec bitrates have no Opus row. Without ffmpeg or without
its libopus encoder the report says so and the codec figures stand alone.

The acoustic tokenizer comes from ``musiclm.tokenizers.backends.load_acoustic``, so a pretrained codec
(EnCodec) named in ``backends.json`` is evaluated the same way, through ``encode``/``decode``/
``frame_rate``/``num_codebooks``/``codebook_size`` only.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["OPUS_MIN_KBPS", "evaluate_codec", "opus_available", "opus_round_trip"]

OPUS_MIN_KBPS = 6.0
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")


# ---------------------------------------------------------------------------------------- Opus


def opus_available() -> tuple[bool, str | None]:
    """``(True, None)`` if ffmpeg with the libopus encoder is on the PATH, else ``(False, reason)``."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return False, "ffmpeg is not installed (apt-get install ffmpeg): no Opus comparison"
    try:
        encoders = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True,
                                  timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError) as err:
        return False, f"ffmpeg could not list its encoders ({err}): no Opus comparison"
    if "libopus" not in encoders:
        return False, "this ffmpeg has no libopus encoder: no Opus comparison"
    return True, None


def opus_round_trip(wav: np.ndarray, kbps: float, sample_rate: int = 24000) -> tuple[np.ndarray, float]:
    """Encode ``wav`` float32 ``[T]`` to Ogg/Opus at ``kbps`` with ffmpeg's libopus and decode it back.

    Returns ``(decoded [T], actual kbps of the Ogg stream)``; the decoded audio is trimmed / zero-padded
    to ``T`` (ffmpeg applies Opus' pre-skip, so the two are aligned)."""
    if kbps < OPUS_MIN_KBPS:
        raise ValueError(f"Opus cannot encode below {OPUS_MIN_KBPS:g} kbps, asked for {kbps:g}")
    raw = np.ascontiguousarray(wav, dtype="<f4").tobytes()
    pcm = ["-f", "f32le", "-ar", str(sample_rate), "-ac", "1"]
    encode = ["ffmpeg", "-hide_banner", "-loglevel", "error", *pcm, "-i", "pipe:0", "-c:a", "libopus",
              "-b:a", str(int(round(kbps * 1000))), "-f", "ogg", "pipe:1"]
    ogg = subprocess.run(encode, input=raw, capture_output=True, timeout=120)
    if ogg.returncode != 0:
        raise RuntimeError(f"ffmpeg libopus encoding failed: {ogg.stderr.decode(errors='replace').strip()[-300:]}")
    decode = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", "pipe:0", *pcm, "pipe:1"]
    out = subprocess.run(decode, input=ogg.stdout, capture_output=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"ffmpeg Opus decoding failed: {out.stderr.decode(errors='replace').strip()[-300:]}")
    decoded = np.frombuffer(out.stdout, dtype="<f4").astype(np.float32)
    decoded = np.pad(decoded[: len(wav)], (0, max(0, len(wav) - len(decoded))))
    actual_kbps = len(ogg.stdout) * 8 / (len(wav) / sample_rate) / 1000
    return decoded, actual_kbps


# ---------------------------------------------------------------------------------------- data


def _runner_eval_fraction() -> float:
    # the runner's default held-out fraction: the clips no training run of that default has seen
    from musiclm.training.runner import train

    return float(inspect.signature(train).parameters["eval_fraction"].default)


def load_eval_clips(
    data: str | Path, *, max_clips: int, seconds: float, sample_rate: int, eval_fraction: float | None = None
) -> tuple[list[np.ndarray], list[str], bool]:
    """Up to ``max_clips`` clips (float32, at most ``seconds`` long) from ``data``.

    ``data`` is a folder of audio shards (``*.tar``: the runner's held-out split, the samples whose key
    ``is_held_out``), a folder of audio files, or one audio file. Returns ``(clips, names, held_out)``;
    ``held_out`` is False only when shards hold no held-out sample and their first samples were used."""
    from musiclm.audio import load_audio

    path = Path(data)
    limit = int(seconds * sample_rate)
    if path.is_file():
        return [load_audio(str(path), sample_rate)[:limit]], [path.name], True
    if not path.is_dir():
        raise FileNotFoundError(f"no audio at {data}: expected a folder of shards or audio files, or an audio file")
    if sorted(path.glob("*.tar")):
        from musiclm.data.shards import iter_samples
        from musiclm.training.runner import is_held_out

        fraction = _runner_eval_fraction() if eval_fraction is None else eval_fraction
        held, fallback = [], []
        for sample in iter_samples(str(path), split_by_node=False, split_by_worker=False):
            if "wav" not in sample:
                raise ValueError(f"{path} holds token shards (sample {sample['__key__']} has no audio): "
                                 "evaluate a codec on audio shards or audio files")
            entry = (np.asarray(sample["wav"], dtype=np.float32)[:limit], sample["__key__"])
            if is_held_out(sample["__key__"], fraction):
                held.append(entry)
                if len(held) >= max_clips:
                    break
            elif len(fallback) < max_clips:
                fallback.append(entry)
        chosen, held_out = (held, True) if held else (fallback, False)
        if not chosen:
            raise ValueError(f"no audio samples in the shards of {path}")
        return [c for c, _ in chosen], [n for _, n in chosen], held_out
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)[:max_clips]
    if not files:
        raise ValueError(f"{path} has neither shards (*.tar) nor audio files ({', '.join(AUDIO_SUFFIXES)})")
    return [load_audio(str(f), sample_rate)[:limit] for f in files], [str(f.relative_to(path)) for f in files], True


# ---------------------------------------------------------------------------------------- evaluation


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


@torch.inference_mode()
def evaluate_codec(
    ckpt_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    max_clips: int = 16,
    seconds: float = 10.0,
    num_quantizers: Sequence[int] | None = None,
    opus: bool = True,
    eval_fraction: float | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate the acoustic tokenizer of ``ckpt_dir`` on the held-out audio of ``data``; write
    ``codec_eval.json``, ``codec_eval.md`` and ``codec_spectrograms.png`` into ``out_dir`` and return
    the report (``rows``: one per level count with codec and Opus figures).

    ``num_quantizers``: the level counts to score (default 1, 2, 4, 8 and all, within the codec's
    levels); ``eval_fraction``: the held-out fraction of shard samples (default: the training runner's).
    """
    from musiclm.evaluation.learning import mel_distance, si_snr
    from musiclm.tokenizers.backends import load_acoustic, read_backends

    codec = load_acoustic(ckpt_dir, device=device)
    levels_total = int(codec.num_codebooks)
    if num_quantizers is None:
        levels = sorted({k for k in (1, 2, 4, 8) if k < levels_total} | {levels_total})
    else:
        levels = sorted({int(k) for k in num_quantizers})
        bad = [k for k in levels if not 1 <= k <= levels_total]
        if bad or not levels:
            raise ValueError(f"num_quantizers must be in 1..{levels_total} (this codec's levels), got {list(num_quantizers)}")
    sample_rate, frame_rate = int(getattr(codec, "sample_rate", 24000)), float(codec.frame_rate)
    hop = int(round(sample_rate / frame_rate))
    bits = math.log2(int(codec.codebook_size))

    clips, names, held_out = load_eval_clips(data, max_clips=max_clips, seconds=seconds, sample_rate=sample_rate,
                                             eval_fraction=eval_fraction)
    clips = [c[: len(c) // hop * hop] for c in clips]
    kept = [(c, n) for c, n in zip(clips, names) if len(c) > 0]
    if not kept:
        raise ValueError(f"every clip in {data} is shorter than one codec frame ({hop} samples)")
    clips, names = [c for c, _ in kept], [n for _, n in kept]

    use_opus, opus_reason = opus_available() if opus else (False, "Opus comparison switched off")
    per_level: dict[int, dict[str, list[float]]] = {k: {"si_snr": [], "mel": [], "opus_si_snr": [], "opus_mel": [],
                                                        "opus_kbps": []} for k in levels}
    examples: dict[str, np.ndarray] = {}
    for i, wav in enumerate(clips):
        target = torch.from_numpy(wav)[None].to(device)  # [1, T]
        codes = codec.encode(target)  # [1, K, F]
        for k in levels:
            recon = codec.decode(codes[:, :k]).float()[:, : target.shape[-1]]  # [1, <=T]
            ref = target[:, : recon.shape[-1]]
            per_level[k]["si_snr"].append(float(si_snr(recon.cpu(), ref.cpu())[0]))
            per_level[k]["mel"].append(float(mel_distance(recon.cpu(), ref.cpu())[0]))
            if i == 0 and k == levels[-1]:
                examples["codec"] = recon[0].cpu().numpy()
            kbps = k * bits * frame_rate / 1000
            if use_opus and kbps >= OPUS_MIN_KBPS - 1e-9:
                decoded, actual = opus_round_trip(wav, kbps, sample_rate)
                opus_wav = torch.from_numpy(decoded)[None]
                per_level[k]["opus_si_snr"].append(float(si_snr(opus_wav, target.cpu())[0]))
                per_level[k]["opus_mel"].append(float(mel_distance(opus_wav, target.cpu())[0]))
                per_level[k]["opus_kbps"].append(actual)
                if i == 0 and "opus" not in examples:
                    examples["opus"], examples["opus_kbps"] = decoded, np.array(kbps)
        if i == 0:
            examples["original"] = wav

    rows = []
    for k in levels:
        m = per_level[k]
        kbps = k * bits * frame_rate / 1000
        row: dict[str, Any] = {"levels": k, "kbps": round(kbps, 3), "si_snr_db": _mean(m["si_snr"]),
                               "mel_distance": _mean(m["mel"])}
        if m["opus_kbps"]:
            row.update(opus_kbps=round(kbps, 3), opus_actual_kbps=round(float(np.mean(m["opus_kbps"])), 3),
                       opus_si_snr_db=_mean(m["opus_si_snr"]), opus_mel_distance=_mean(m["opus_mel"]))
        else:
            row["opus_note"] = opus_reason if not use_opus else f"below Opus' {OPUS_MIN_KBPS:g} kbps minimum"
        rows.append(row)

    spec = read_backends(ckpt_dir)["acoustic"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "ckpt_dir": str(ckpt_dir),
        "backend": spec.backend,
        "data": str(data),
        "held_out": held_out,
        "clips": len(clips),
        "clip_names": names,
        "seconds": round(float(np.mean([len(c) for c in clips])) / sample_rate, 3),
        "sample_rate": sample_rate,
        "frame_rate": frame_rate,
        "num_codebooks": levels_total,
        "codebook_size": int(codec.codebook_size),
        "opus": {"available": use_opus, "reason": opus_reason, "min_kbps": OPUS_MIN_KBPS},
        "rows": rows,
        "files": {name: str(out / name) for name in ("codec_eval.json", "codec_eval.md", "codec_spectrograms.png")},
    }
    _spectrograms(examples, sample_rate, levels[-1], rows[-1]["kbps"], out / "codec_spectrograms.png", names[0])
    (out / "codec_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "codec_eval.md").write_text(report_markdown(report))
    return report


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (codec and Opus side by side, one row per level count)."""
    split = "held-out split" if report["held_out"] else "NOT held out: the shards hold no held-out sample"
    lines = [
        f"# Codec evaluation: {report['backend']}",
        "",
        f"{report['clips']} clips of {report['seconds']:g} s from `{report['data']}` ({split}); "
        f"{report['num_codebooks']} levels x {report['codebook_size']} codes at {report['frame_rate']:g} Hz.",
        "",
        "| levels | kbps | SI-SNR dB | mel distance | Opus kbps (actual) | Opus SI-SNR dB | Opus mel distance |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        if "opus_kbps" in r:
            opus = (f"{r['opus_kbps']:g} ({r['opus_actual_kbps']:.2f}) | {_fmt(r['opus_si_snr_db'], 2)} | "
                    f"{_fmt(r['opus_mel_distance'], 3)}")
        else:
            opus = f"– | – | – ({r['opus_note']})"
        lines.append(f"| {r['levels']} | {r['kbps']:g} | {_fmt(r['si_snr_db'], 2)} | {_fmt(r['mel_distance'], 3)} | {opus} |")
    lines += ["", "SI-SNR: higher is better. Mel distance: mean |log-mel difference| over windows 2^6..2^11, "
              "lower is better. Opus via ffmpeg libopus, 24 kHz mono; its actual rate includes Ogg overhead.", ""]
    if not report["opus"]["available"]:
        lines += [f"Opus: {report['opus']['reason']}.", ""]
    return "\n".join(lines)


def _spectrograms(examples: dict[str, np.ndarray], sample_rate: int, levels: int, kbps: float, path: Path,
                  name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("original", examples["original"]), (f"codec, {levels} levels ({kbps:g} kbps)", examples["codec"])]
    if "opus" in examples:
        panels.append((f"Opus {float(examples['opus_kbps']):g} kbps", examples["opus"]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), sharex=True, squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (title, wav) in zip(axes[:, 0], panels):
        dither = 1e-9 * rng.standard_normal(len(wav))  # the log of exact zeros
        ax.specgram(wav + dither, NFFT=1024, Fs=sample_rate, noverlap=768, cmap="magma", vmin=-160)
        ax.set_title(f"{title} — {name}"[:100], fontsize=9)
        ax.set_ylabel("Hz")
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
