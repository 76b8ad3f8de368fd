"""``musiclm eval mulan``: how well the conditioner's towers tie music and text together, on held-out clips.

MuLan (Huang et al., 2022) is judged by retrieval and zero-shot tagging; MusicLM adds that text goes
through the RVQ fitted on *audio* embeddings. On the held-out captioned clips of a folder of audio
shards (the split the trainer never sees: :func:`musiclm.training.runner.is_held_out` at the runner's
default fraction) this measures

* text → audio and audio → text retrieval, recall@1/5/10. Clips that share a caption are all right
  answers for it: the queries/candidates are the *distinct* captions, and every recall is set against
  the exact chance level of that layout;
* zero-shot tagging: every aspect of the evaluated clips' aspect lists is embedded as a text prompt
  and ranks the clips; mean average precision and ROC-AUC over the aspects against chance (the
  expected AP of a random ranking, which is well above the prevalence for rare aspects, and 0.5);
* when ``mulan_rvq/`` is present: per RVQ level, how often a caption's tokens equal its clip's tokens
  (the M_T-for-M_A swap MusicLM relies on), against the agreement of randomly paired clips and captions.

Ties count as ties: a model that gives every clip the same embedding scores chance, not R@1 = 1
(a tied group is ranked in random order and the *expected* recall / AP is reported).

Any conditioner backend is evaluated the same way (towers from
:func:`musiclm.tokenizers.backends.load_conditioner_towers`). Writes ``mulan_eval.json`` and
``mulan_eval.md``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from musiclm.constants import SAMPLE_RATE

EVAL_JSON = "mulan_eval.json"
EVAL_MD = "mulan_eval.md"
KS = (1, 5, 10)
DEFAULT_PROMPT = "{aspect}"  # MuLan tags zero-shot with the tag's own words
TIE_TOLERANCE = 1e-6  # cosine similarities closer than this are ties


@dataclass
class Clip:
    key: str
    wav: np.ndarray  # float32 [T], 24 kHz
    caption: str
    aspects: list[str]


def default_eval_fraction() -> float:
    """The held-out fraction ``musiclm train`` uses by default (so evaluation sees exactly its eval split)."""
    from musiclm.training import runner

    return float(inspect.signature(runner.train).parameters["eval_fraction"].default)


# ----------------------------------------------------------------------------- data


def _raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """The raw members of each sample of one shard, ``{"__key__", "json": bytes, "flac": bytes, ...}``,
    in file order (a shard holds a sample's members contiguously). Audio is decoded later, and only
    for the clips evaluated."""
    import fsspec

    current: dict[str, Any] = {}
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, suffix = name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            current.setdefault("__key__", key)
            current[suffix] = tar.extractfile(member).read()
    if current:
        yield current


def held_out_clips(
    data: str | os.PathLike | Sequence[str], *, eval_fraction: float, max_clips: int
) -> tuple[list[Clip], dict[str, Any]]:
    """Up to ``max_clips`` held-out captioned clips of the audio shards ``data`` (a folder or shard URLs),
    in shard order, and counts of what was scanned."""
    from musiclm.data.captions import normalize_aspects
    from musiclm.data.shards import decode_sample, list_shards
    from musiclm.training.runner import is_held_out

    urls = list_shards(data) if isinstance(data, (str, os.PathLike)) else [str(u) for u in data]
    clips: list[Clip] = []
    scanned = held = uncaptioned = no_audio = 0
    for url in urls:
        for raw in _raw_samples(url):
            scanned += 1
            if not is_held_out(raw["__key__"], eval_fraction):
                continue
            held += 1
            document = json.loads(raw["json"]) if "json" in raw else {}
            caption = str(document.get("caption") or "").strip()
            if not caption:
                uncaptioned += 1
                continue
            if "flac" not in raw:
                no_audio += 1
                continue
            wav = decode_sample(raw)["wav"]
            clips.append(Clip(raw["__key__"], wav, caption, normalize_aspects(document.get("aspects"))))
            if len(clips) >= max_clips:
                break
        if len(clips) >= max_clips:
            break
    counts = {"shards": len(urls), "samples_scanned": scanned, "held_out_samples": held,
              "held_out_uncaptioned": uncaptioned, "held_out_without_audio": no_audio,
              "stopped_at_max_clips": len(clips) >= max_clips}
    return clips, counts


# ----------------------------------------------------------------------------- embeddings


@torch.inference_mode()
def embed_clips(towers: Any, wavs: Sequence[np.ndarray], *, batch_size: int = 16, device: Any = "cpu") -> torch.Tensor:
    """L2-normalised audio embeddings [N, D] of clips of any lengths (batched by equal length; each
    clip is the mean over its 10-s windows at a 1-s stride, the towers' rule)."""
    out: list[torch.Tensor | None] = [None] * len(wavs)
    by_length: dict[int, list[int]] = {}
    for i, wav in enumerate(wavs):
        by_length.setdefault(len(wav), []).append(i)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = torch.from_numpy(np.stack([np.asarray(wavs[i], dtype=np.float32) for i in chunk])).to(device)
            for i, emb in zip(chunk, towers.embed_audio(batch).float().cpu()):  # [B, D]
                out[i] = emb
    return F.normalize(torch.stack(out), dim=-1)  # [N, D]


@torch.inference_mode()
def embed_texts(towers: Any, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised text embeddings [N, D]."""
    parts = [towers.embed_text(list(texts[i : i + batch_size])).float().cpu() for i in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(parts), dim=-1)


# ----------------------------------------------------------------------------- metrics


def hit_probability(above: int, tied_other: int, tied_match: int, k: int) -> float:
    """P(a right answer is among the top ``k``) when ``above`` wrong candidates score strictly higher
    than the best right one, and the group tied with it holds ``tied_match`` right and ``tied_other``
    wrong candidates in random order. With nothing above and everything tied this is chance."""
    j = k - above  # places left for the tied group
    if j <= 0:
        return 0.0
    if j > tied_other:
        return 1.0
    # all j first places of the tied group wrong: C(other, j) / C(other + match, j)
    return 1.0 - math.comb(tied_other, j) / math.comb(tied_other + tied_match, j)


def recall_at_k(similarity: np.ndarray, match: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Expected recall@k of queries (rows of ``similarity`` [Q, C]) whose right candidates are ``match``
    [Q, C] (each row has at least one), ties broken at random, and the chance level of the same layout."""
    hits = {k: 0.0 for k in ks}
    chance = {k: 0.0 for k in ks}
    for sim, right in zip(similarity, match):
        best = sim[right].max()
        tied = np.abs(sim - best) <= TIE_TOLERANCE
        above = int((~right & (sim > best + TIE_TOLERANCE)).sum())
        tied_other, tied_match = int((~right & tied).sum()), int((right & tied).sum())
        m = int(right.sum())
        for k in ks:
            hits[k] += hit_probability(above, tied_other, tied_match, k)
            chance[k] += hit_probability(0, len(sim) - m, m, k)
    q = len(similarity)
    return {**{f"r{k}": hits[k] / q for k in ks}, **{f"chance_r{k}": chance[k] / q for k in ks}}


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of ranking by ``scores`` (higher first) for binary ``labels``, in expectation
    over a random order of tied scores (a constant scorer gets :func:`chance_average_precision`)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(bool)
    starts = np.r_[0, np.nonzero(np.diff(s))[0] + 1]  # first index of each group of equal scores
    ends = np.r_[starts[1:], len(s)]
    total, above = 0.0, 0  # above: positives ranked before the current group
    for a, b in zip(starts, ends):
        group_pos = int(y[a:b].sum())
        if group_pos:
            ranks = np.arange(a + 1, b + 1)  # the group's places (1-based), each equally likely
            # expected positives of the group ahead of one at place r: (r - a - 1)(p - 1)/(g - 1)
            ahead = (ranks - a - 1) * (group_pos - 1) / (b - a - 1) if b - a > 1 else 0.0
            total += group_pos * float(np.mean((above + 1 + ahead) / ranks))
        above += group_pos
    return total / above


def chance_average_precision(n: int, positives: int) -> float:
    """Expected average precision of a uniformly random ranking of ``n`` items with ``positives`` right
    ones: each positive's place r is uniform and (r-1)(P-1)/(n-1) positives precede it on average, so
    E[AP] = (H_n + (P-1)(n-H_n)/(n-1)) / n, H_n the harmonic number (more than P/n for few positives)."""
    if n == 1:
        return 1.0
    h = float(np.sum(1.0 / np.arange(1, n + 1)))
    return (h + (positives - 1) * (n - h) / (n - 1)) / n


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(a positive outscores a negative), ties counting one half."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)  # average ranks for ties
    pos = labels.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tagging_metrics(scores: np.ndarray, labels: np.ndarray, aspects: Sequence[str]) -> dict[str, Any]:
    """Zero-shot tagging from ``scores`` [N clips, A aspects]: mAP and mean ROC-AUC over the aspects
    that have both positive and negative clips, with their chance levels (a random ranking's)."""
    scores = np.round(scores / TIE_TOLERANCE) * TIE_TOLERANCE  # closer than the tolerance: a tie
    rows = []
    n = len(labels)
    for a, name in enumerate(aspects):
        positives = int(labels[:, a].sum())
        if 0 < positives < n:
            rows.append({"aspect": name, "positives": positives,
                         "ap": average_precision(scores[:, a], labels[:, a]), "auc": roc_auc(scores[:, a], labels[:, a]),
                         "chance_ap": chance_average_precision(n, positives)})
    rows.sort(key=lambda r: (-r["positives"], r["aspect"]))
    if not rows:
        return {"aspects": len(aspects), "aspects_evaluated": 0, "per_aspect": []}
    return {
        "aspects": len(aspects),
        "aspects_evaluated": len(rows),
        "map": float(np.mean([r["ap"] for r in rows])),
        "chance_map": float(np.mean([r["chance_ap"] for r in rows])),
        "mean_auc": float(np.mean([r["auc"] for r in rows])),
        "chance_auc": 0.5,
        "per_aspect": rows,
    }


def token_consistency(audio_codes: torch.Tensor, text_codes: torch.Tensor) -> dict[str, Any]:
    """Per RVQ level, how often a clip's text tokens equal its audio tokens (``[N, K]`` each), how often
    all levels up to it do, and the per-level agreement of randomly paired clips and captions."""
    a, t = audio_codes.long(), text_codes.long()
    equal = a == t  # [N, K]
    chance = []
    for level in range(a.shape[1]):
        size = int(max(a[:, level].max(), t[:, level].max())) + 1
        pa = torch.bincount(a[:, level], minlength=size).double() / len(a)
        pt = torch.bincount(t[:, level], minlength=size).double() / len(t)
        chance.append(float((pa * pt).sum()))
    return {
        "levels": int(a.shape[1]),
        "equal_per_level": [float(x) for x in equal.double().mean(0)],
        "prefix_equal_per_level": [float(x) for x in equal.long().cummin(dim=1).values.double().mean(0)],
        "chance_equal_per_level": chance,
    }


def mulan_metrics(
    towers: Any,
    clips: Sequence[Clip],
    *,
    rvq: Any = None,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = 16,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Retrieval, zero-shot tagging and (given the RVQ) token consistency of ``towers`` on ``clips``."""
    if len(clips) < 2:
        raise ValueError(f"MuLan evaluation needs at least 2 captioned clips, got {len(clips)}")
    audio = embed_clips(towers, [c.wav for c in clips], batch_size=batch_size, device=device)  # [N, D]
    captions = list(dict.fromkeys(c.caption for c in clips))
    index = {c: i for i, c in enumerate(captions)}
    clip_caption = np.array([index[c.caption] for c in clips])  # [N]
    text = embed_texts(towers, captions)  # [M, D]
    sim = (text @ audio.T).numpy()  # [M captions, N clips]
    match = clip_caption[None, :] == np.arange(len(captions))[:, None]  # [M, N]
    own = sim[clip_caption, np.arange(len(clips))]  # [N] cosine of each clip with its caption
    others = ~match.T  # [N clips, M captions]: the caption is not the clip's
    result: dict[str, Any] = {
        "clips": len(clips),
        "distinct_captions": len(captions),
        "text_to_audio": recall_at_k(sim, match),
        "audio_to_text": recall_at_k(sim.T, match.T),
        "mean_matched_cosine": float(own.mean()),
        "mean_unmatched_cosine": float(sim.T[others].mean()) if others.any() else None,
    }

    vocabulary = sorted({a for c in clips for a in c.aspects})
    if vocabulary:
        aspect_text = embed_texts(towers, [prompt.format(aspect=a) for a in vocabulary])  # [A, D]
        scores = (audio @ aspect_text.T).numpy()  # [N, A]
        column = {a: j for j, a in enumerate(vocabulary)}
        labels = np.zeros(scores.shape, dtype=bool)
        for i, c in enumerate(clips):
            labels[i, [column[a] for a in c.aspects]] = True
        result["tagging"] = {"prompt": prompt, **tagging_metrics(scores, labels, vocabulary)}
    else:
        result["tagging"] = {"prompt": prompt, "aspects": 0, "aspects_evaluated": 0, "per_aspect": []}

    if rvq is not None:
        if rvq.dim != audio.shape[1]:
            raise ValueError(f"mulan_rvq/ quantizes {rvq.dim}-d embeddings, the towers make {audio.shape[1]}-d ones")
        with torch.inference_mode():
            audio_codes = rvq.encode(audio.unsqueeze(1)).squeeze(1)  # [N, K]
            text_codes = rvq.encode(text.unsqueeze(1)).squeeze(1)[torch.from_numpy(clip_caption)]  # [N, K]
        result["tokens"] = token_consistency(audio_codes, text_codes)
    return result


# ----------------------------------------------------------------------------- the command


def evaluate_mulan(
    tokenizers: str | os.PathLike,
    data: str | os.PathLike | Sequence[str],
    out_dir: str | os.PathLike | None = None,
    *,
    max_clips: int = 256,
    device: str = "cpu",
    eval_fraction: float | None = None,
    prompt: str = DEFAULT_PROMPT,
    preset: str | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Evaluate the conditioner of the tokenizer folder ``tokenizers`` on the held-out captioned clips
    (at most ``max_clips``) of the audio shards ``data``; write ``mulan_eval.json`` / ``.md`` to
    ``out_dir`` when given. ``eval_fraction`` defaults to the trainer's, so the clips are ones it never
    trained on (``1.0`` evaluates every clip)."""
    from musiclm.tokenizers.backends import load_conditioner_towers, read_backends

    if max_clips < 2:
        raise ValueError(f"max_clips must be at least 2, got {max_clips}")
    fraction = default_eval_fraction() if eval_fraction is None else float(eval_fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1], got {fraction}")
    ckpt = Path(tokenizers)
    spec = read_backends(ckpt)["conditioner"]
    towers = load_conditioner_towers(ckpt, preset, device)
    rvq = None
    if (ckpt / "mulan_rvq" / "config.json").is_file():
        from musiclm.tokenizers.mulan import load_mulan_rvq

        rvq = load_mulan_rvq(ckpt / "mulan_rvq")
    clips, counts = held_out_clips(data, eval_fraction=fraction, max_clips=max_clips)
    if len(clips) < 2:
        raise ValueError(
            f"{data}: {len(clips)} held-out captioned clip(s) among {counts['samples_scanned']} samples "
            f"(eval_fraction {fraction}); MuLan evaluation needs at least 2: add data or raise eval_fraction"
        )
    result = {
        "tokenizers": str(ckpt),
        "conditioner": spec.backend,
        "data": str(data) if isinstance(data, (str, os.PathLike)) else [str(u) for u in data],
        "eval_fraction": fraction,
        **counts,
        "clip_seconds": {"min": min(len(c.wav) for c in clips) / SAMPLE_RATE,
                         "max": max(len(c.wav) for c in clips) / SAMPLE_RATE},
        **mulan_metrics(towers, clips, rvq=rvq, prompt=prompt, batch_size=batch_size, device=device),
    }
    if out_dir is not None:
        write_report(result, out_dir)
    return result


def write_report(result: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``mulan_eval.json`` (everything) and ``mulan_eval.md`` (the tables a person reads)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / EVAL_JSON, out / EVAL_MD
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(report_markdown(result))
    return json_path, md_path


def report_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# MuLan evaluation ({result.get('conditioner', '?')} towers)",
        "",
        f"{result['clips']} held-out captioned clips ({result['distinct_captions']} distinct captions) of "
        f"{result.get('samples_scanned', '?')} samples scanned in {result.get('shards', '?')} shard(s); "
        f"held-out fraction {result.get('eval_fraction', '?')}.",
        "",
        "## Retrieval (recall@k; identical captions count as matches; ties broken at random)",
        "",
        "| direction | " + " | ".join(f"R@{k}" for k in KS) + " | " + " | ".join(f"chance R@{k}" for k in KS) + " |",
        "|---|" + "---:|" * (2 * len(KS)),
    ]
    for name in ("text_to_audio", "audio_to_text"):
        r = result[name]
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(f"{r[f'r{k}']:.3f}" for k in KS) + " | "
                     + " | ".join(f"{r[f'chance_r{k}']:.3f}" for k in KS) + " |")
    unmatched = result.get("mean_unmatched_cosine")
    lines += ["", f"Mean cosine of a clip with its caption {result['mean_matched_cosine']:.3f}"
              + (f", with other captions {unmatched:.3f}." if unmatched is not None else ".")]
    tag = result["tagging"]
    lines += ["", f"## Zero-shot tagging (prompt `{tag['prompt']}`)", ""]
    if tag.get("aspects_evaluated"):
        lines += [
            f"{tag['aspects_evaluated']} of {tag['aspects']} aspects have both positive and negative clips.",
            "",
            "| metric | model | chance |",
            "|---|---:|---:|",
            f"| mAP | {tag['map']:.3f} | {tag['chance_map']:.3f} |",
            f"| mean ROC-AUC | {tag['mean_auc']:.3f} | {tag['chance_auc']:.3f} |",
            "",
            "| aspect | clips | AP | ROC-AUC |",
            "|---|---:|---:|---:|",
            *(f"| {r['aspect']} | {r['positives']} | {r['ap']:.3f} | {r['auc']:.3f} |" for r in tag["per_aspect"][:20]),
        ]
        if len(tag["per_aspect"]) > 20:
            lines.append(f"\n({len(tag['per_aspect']) - 20} more aspects in {EVAL_JSON})")
    else:
        lines.append("No aspect has both positive and negative clips: nothing to score.")
    tokens = result.get("tokens")
    if tokens:
        lines += [
            "", "## Text tokens vs audio tokens (mulan_rvq/)", "",
            "| level | equal | all levels so far equal | chance (random pairs) |",
            "|---:|---:|---:|---:|",
            *(f"| {i + 1} | {e:.3f} | {p:.3f} | {c:.3f} |" for i, (e, p, c) in enumerate(zip(
                tokens["equal_per_level"], tokens["prefix_equal_per_level"], tokens["chance_equal_per_level"]))),
        ]
    return "\n".join(lines) + "\n"
