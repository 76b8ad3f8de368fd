"""Beam job: a sample of semantic features spread across a whole corpus, for the corpus-scale k-means.

    Create(shards) -> ReadAudioShard --+
    Create(files)  -> ReadWindows -----+-> SkipFinishedChunks -> SelectFrames -> Batch -> ComputeFeatures
                                              -> AssignChunk -> GroupByKey -> WriteChunk -> manifest.json
          dead letters (per shard sample, per file, per window) -------------------------> dead_letter.jsonl

The semantic tokens' k-means (1024 centroids) is fitted on features of the *whole* corpus, not of its
first files: every crop window keeps the same fraction of its 25-Hz frames, chosen at random but
deterministically from (seed, window key), so the sample is an even spread over all the audio and a
rerun picks the same frames. The fraction is ``frames_per_window / frames in a window`` capped so
that the expected total is ``max_frames`` (the corpus' window count is known before the run: from the
shards' manifests, or from the audio files' headers).

The feature model is whatever ``musiclm.tokenizers.backends.load_semantic_features`` loads for the
tokenizer folder (our w2v-BERT, or a pretrained HuBERT / w2v-BERT 2.0), once per DoFn in ``setup()``.
Frames go to ``features-000000.npy`` chunks (float16 ``[n, D]`` by default, rows sorted by window key)
that :func:`iter_feature_batches` streams back one chunk at a time, so the fit never holds every frame.
Chunks are assigned from the window key and written under a temporary name, then renamed; with the
same ``plan.json`` a rerun skips the windows of the chunks already written (a killed job finishes the
rest), like the other jobs.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import fsspec
import numpy as np
from apache_beam.metrics import Metrics

from musiclm.constants import SAMPLE_RATE, SEMANTIC_HOP
from musiclm.data import shards as sh
from musiclm.pipelines.options import build_pipeline_options, is_local_runner
from musiclm.pipelines.prepare_audio import (
    DEAD,
    NAMESPACE,
    ReadWindows,
    SkipFinishedShards,
    WriteDeadLetters,
    expand_inputs,
    metric_totals,
    record_plan,
)
from musiclm.pipelines.progress import ProgressMonitor, record_progress

FEATURES_PREFIX = "features"
FEATURES_KIND = "semantic_features"
FEATURES_SCHEMA = 1
DEFAULT_MAX_FRAMES = 1_000_000
DEFAULT_CHUNK_FRAMES = 65_536  # float16 x 1024-d: 128 MB per chunk, the fit's memory bound
BATCH = 8


# ----------------------------------------------------------------------------- planning


def split_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(audio shard URLs, audio file URIs). A folder holding ``audio-*.tar`` shards (or a ``.tar`` path) is
    read as audio shards (the output of ``musiclm prepare-audio``); anything else as audio files."""
    shard_urls: list[str] = []
    others: list[str] = []
    for item in inputs:
        text = str(item)
        if text.endswith(".tar"):
            shard_urls.append(text)
            continue
        fs, path = fsspec.core.url_to_fs(text)
        if fs.isdir(path) and (fs.glob(path.rstrip("/") + f"/{sh.AUDIO_SHARD_PREFIX}-*.tar")):
            shard_urls.extend(sh.list_shards(text, sh.AUDIO_SHARD_PREFIX))
        else:
            others.append(text)
    return sorted(set(shard_urls)), expand_inputs(others) if others else []


def _shard_window_counts(shard_urls: Sequence[str]) -> dict[str, tuple[int, float | None]]:
    """Per shard URL: (windows, window seconds) from the folders' manifests; counted in the tar otherwise."""
    counts: dict[str, tuple[int, float | None]] = {}
    folders: dict[str, list[str]] = {}
    for url in shard_urls:
        folders.setdefault(url.rsplit("/", 1)[0], []).append(url)
    for folder, urls in folders.items():
        manifest = sh.read_manifest(folder) or {}
        listed = {s["name"]: int(s["samples"]) for s in manifest.get("shards", [])}
        seconds = manifest.get("window_seconds")
        for url in urls:
            name = url.rsplit("/", 1)[-1]
            if name in listed:
                counts[url] = (listed[name], seconds)
            else:
                try:
                    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                        keys = {m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in tar if m.isfile()}
                except (OSError, tarfile.TarError):
                    keys = set()  # unreadable: it will be dead-lettered by the job
                counts[url] = (len(keys), None)
    return counts


def _file_windows(uri: str, window: int, hop: int) -> int:
    """Crop windows of one audio file from its header (0 when unreadable: the job dead-letters it)."""
    import soundfile as sf

    from musiclm.audio import window_starts

    try:
        with fsspec.open(uri, "rb") as f:
            info = sf.info(f)
    except Exception:
        return 0
    samples = int(math.floor(info.frames * SAMPLE_RATE / info.samplerate)) if info.samplerate else 0
    return len(window_starts(samples, window, hop))


def keep_fraction(total_frames: int, frames_per_window: int | None, frames_in_window: int, max_frames: int | None) -> float:
    """The fraction of every window's frames the sample keeps."""
    fraction = 1.0
    if frames_per_window is not None:
        fraction = min(fraction, frames_per_window / max(1, frames_in_window))
    if max_frames is not None and total_frames > 0:
        fraction = min(fraction, max_frames / total_frames)
    return fraction


def feature_model_id(tokenizers: str) -> dict[str, Any]:
    """Which feature model the sample comes from (recorded in the plan, the manifest and the k-means)."""
    from musiclm.checkpoint import artifact_id
    from musiclm.tokenizers.backends import read_backends

    spec = read_backends(tokenizers)["semantic"]
    if spec.pretrained:
        return {"backend": spec.backend, "path": spec.path, "options": spec.options}
    return {"backend": spec.backend, "id": artifact_id(os.path.join(str(tokenizers), "w2vbert"))}


def window_rng(seed: int, key: str) -> np.random.Generator:
    """The random stream of one window: a function of (seed, key) only, the same on every worker and rerun."""
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")])


def select_frames(num_frames: int, fraction: float, seed: int, key: str) -> np.ndarray:
    """Sorted indices of the frames a window keeps: ``floor(f n)`` of them, one more with probability
    ``frac(f n)``, so the expected count is exactly ``fraction x num_frames``."""
    rng = window_rng(seed, key)
    wanted = fraction * num_frames
    count = int(wanted) + int(rng.random() < wanted - int(wanted))
    count = min(count, num_frames)
    return np.sort(rng.choice(num_frames, size=count, replace=False)) if count else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------- DoFns


class ReadAudioShard(beam.DoFn):
    """An audio shard URL -> its windows ``{"key", "uri", "start", "end", "wav"}``, streamed member by
    member. A sample that does not decode is a dead letter (``shard#key``); so is a shard that does not
    open, after the samples read before the damage."""

    def __init__(self, progress_path: str | None = None):
        self.progress_path = progress_path
        self.ok = Metrics.counter(NAMESPACE, "shard_windows_ok")
        self.dead = Metrics.counter(NAMESPACE, "shard_windows_dead")

    def process(self, url: str) -> Iterable[Any]:
        current: str | None = None
        members: dict[str, bytes] = {}
        try:
            with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                    if key != current and current is not None:
                        yield from self._window(url, current, members)
                        members = {}
                    current = key
                    members[ext] = tar.extractfile(member).read()
        except (OSError, tarfile.TarError, EOFError) as err:
            self.dead.inc()
            record_progress(self.progress_path, files=1, dead=1)
            yield beam.pvalue.TaggedOutput(DEAD, sh.dead_letter(url, f"unreadable shard: {type(err).__name__}: {err}", "read"))
            return
        if current is not None:
            yield from self._window(url, current, members)
        record_progress(self.progress_path, files=1)

    def _window(self, url: str, key: str, members: dict[str, bytes]) -> Iterable[Any]:
        from musiclm.audio import AudioError, decode_audio_bytes

        uri = f"{url}#{key}"
        if "flac" not in members:
            self.dead.inc()
            yield beam.pvalue.TaggedOutput(DEAD, sh.dead_letter(uri, "sample has no flac member", "read"))
            return
        try:
            wav = decode_audio_bytes(members["flac"])
            meta = json.loads(members["json"]) if "json" in members else {}
        except (AudioError, ValueError) as err:
            self.dead.inc()
            yield beam.pvalue.TaggedOutput(DEAD, sh.dead_letter(uri, str(err), "read"))
            return
        self.ok.inc()
        start = float(meta.get("start", 0.0))
        yield {"key": key, "uri": meta.get("source", uri), "start": start,
               "end": float(meta.get("end", start + len(wav) / SAMPLE_RATE)), "wav": wav}


class SelectFrames(beam.DoFn):
    """A window -> the same window with ``frames``, the indices of the 25-Hz frames it keeps; windows
    keeping none are dropped before any feature is computed."""

    def __init__(self, fraction: float, seed: int):
        self.fraction, self.seed = fraction, seed
        self.selected = Metrics.counter(NAMESPACE, "frames_selected")
        self.windows = Metrics.counter(NAMESPACE, "windows_sampled")
        self.dropped = Metrics.counter(NAMESPACE, "windows_without_frames")

    def process(self, window: dict[str, Any]) -> Iterable[Any]:
        num_frames = len(window["wav"]) // SEMANTIC_HOP
        if num_frames == 0:
            reason = f"window at {window['start']:.2f} s is shorter than one semantic frame ({SEMANTIC_HOP} samples)"
            yield beam.pvalue.TaggedOutput(DEAD, sh.dead_letter(window["uri"], reason, "features"))
            return
        frames = select_frames(num_frames, self.fraction, self.seed, window["key"])
        if frames.size == 0:
            self.dropped.inc()
            return
        self.windows.inc()
        self.selected.inc(int(frames.size))
        yield {**window, "wav": window["wav"][: num_frames * SEMANTIC_HOP], "frames": frames}


class ComputeFeatures(beam.DoFn):
    """A batch of windows -> ``(key, features[n, D])`` of the selected frames, in ``dtype``.

    The feature model is loaded once per DoFn instance in ``setup``. Windows of equal length run as
    one batch; a failing batch is retried window by window so that only the culprit is dead-lettered.
    """

    def __init__(self, tokenizers: str, dtype: str = "float16", device: str = "cpu", progress_path: str | None = None):
        self.tokenizers, self.dtype, self.device, self.progress_path = tokenizers, dtype, device, progress_path
        self.done = Metrics.counter(NAMESPACE, "windows_featurized")
        self.failed = Metrics.counter(NAMESPACE, "windows_dead")

    def setup(self) -> None:
        from musiclm.tokenizers.backends import load_semantic_features
        from musiclm.tokenizers.bundle import local_checkpoint_dir

        self.model = load_semantic_features(local_checkpoint_dir(self.tokenizers), device=self.device)

    def _features(self, windows: list[dict[str, Any]]) -> list[np.ndarray]:
        import torch

        wav = torch.from_numpy(np.stack([np.asarray(w["wav"], dtype=np.float32) for w in windows]))  # [B, T]
        with torch.inference_mode():
            feats = self.model.features(wav.to(self.device)).float().cpu().numpy()  # [B, F, D]
        if feats.shape[1] != wav.shape[1] // SEMANTIC_HOP:
            raise ValueError(f"the feature model gave {feats.shape[1]} frames for {wav.shape[1] // SEMANTIC_HOP}")
        out = []
        for window, row in zip(windows, feats):
            picked = row[window["frames"]]  # [n, D]
            if not np.isfinite(picked).all():
                raise ValueError("non-finite features")
            out.append(picked.astype(self.dtype))
        return out

    def process(self, windows: list[dict[str, Any]]) -> Iterable[Any]:
        by_length: dict[int, list[dict[str, Any]]] = {}
        for window in windows:
            by_length.setdefault(len(window["wav"]), []).append(window)
        for group in by_length.values():
            try:
                done = list(zip(group, self._features(group)))
            except Exception:
                done = []
                for window in group:  # isolate the failing window(s)
                    try:
                        done.append((window, self._features([window])[0]))
                    except Exception as err:
                        self.failed.inc()
                        reason = f"features of the window at {window['start']:.2f} s failed: {type(err).__name__}: {err}"
                        yield beam.pvalue.TaggedOutput(DEAD, sh.dead_letter(window["uri"], reason, "features"))
            for window, feats in done:
                self.done.inc()
                yield window["key"], feats
            record_progress(self.progress_path, seconds=sum(len(w["wav"]) for w in group) / SAMPLE_RATE)


def chunk_name(index: int) -> str:
    return f"{FEATURES_PREFIX}-{index:06d}.npy"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class WriteChunk(beam.DoFn):
    """``(chunk index, [(key, features)])`` -> ``features-NNNNNN.npy``: rows in key order, so a rerun
    writes the same bytes (and skips the write when they are already there). A small
    ``features-NNNNNN.json`` beside it, written last, marks the chunk finished for a resumed run."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.written = Metrics.counter(NAMESPACE, "chunks_written")

    def process(self, element: tuple[int, Iterable[tuple[str, np.ndarray]]]) -> Iterable[dict[str, Any]]:
        index, items = element
        items = sorted(items, key=lambda kv: kv[0])
        array = np.concatenate([feats for _, feats in items])  # [n, D]
        data = _npy_bytes(array)
        entry = {"name": chunk_name(index), "frames": int(array.shape[0]), "windows": len(items),
                 "dim": int(array.shape[1]), "dtype": str(array.dtype), "sha256": hashlib.sha256(data).hexdigest(),
                 "bytes": len(data)}
        url = sh.join_url(self.out_dir, chunk_name(index))
        if _read_sidecar(self.out_dir, index) != entry:
            sh.write_bytes_atomic(url, data)
            sh.write_bytes_atomic(sh.join_url(self.out_dir, sidecar_name(index)), json.dumps(entry, sort_keys=True).encode())
            self.written.inc()
        yield entry


def sidecar_name(index: int) -> str:
    return f"{FEATURES_PREFIX}-{index:06d}.json"


def _read_sidecar(out_dir: str, index: int) -> dict[str, Any] | None:
    fs, path = fsspec.core.url_to_fs(sh.join_url(out_dir, sidecar_name(index)))
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except ValueError:
        return None


class _WriteFeatureManifest(beam.DoFn):
    def __init__(self, out_dir: str, extra: dict[str, Any]):
        self.out_dir, self.extra = out_dir, extra

    def process(self, entries: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        yield write_feature_manifest(self.out_dir, entries, self.extra)


def write_feature_manifest(out_dir: str, entries: Iterable[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """``manifest.json`` of a feature sample: chunks (sorted) with frame counts and sha256, dim, dtype."""
    chunks = sorted(entries, key=lambda e: e["name"])
    dims = {e["dim"] for e in chunks}
    if len(dims) > 1:
        raise ValueError(f"feature chunks of different sizes {sorted(dims)}: the tokenizer folder changed mid-run")
    manifest = {
        "schema": FEATURES_SCHEMA,
        "kind": FEATURES_KIND,
        "num_shards": len(chunks),
        "num_samples": sum(e["windows"] for e in chunks),
        "num_frames": sum(e["frames"] for e in chunks),
        "dim": dims.pop() if dims else None,
        "dtype": chunks[0]["dtype"] if chunks else None,
        "shards": chunks,
        **extra,
    }
    sh.write_bytes_atomic(sh.join_url(out_dir, sh.MANIFEST_FILE), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


class WriteFeatureChunks(beam.PTransform):
    """``(key, features)`` -> chunks: AssignChunk (stable hash of the key) -> GroupByKey -> WriteChunk -> manifest.
    ``done`` holds the entries of chunks an earlier run of the same plan finished (listed, not rewritten)."""

    def __init__(self, out_dir: str, num_chunks: int, extra: dict[str, Any], done: Sequence[dict[str, Any]] = ()):
        super().__init__()
        self.out_dir, self.num_chunks, self.extra, self.done = out_dir, num_chunks, extra, list(done)

    def expand(self, features: beam.PCollection) -> beam.PCollection:
        num_chunks, done = self.num_chunks, self.done
        return (
            features
            | "AssignChunk" >> beam.Map(lambda kv: (sh.shard_index(kv[0], num_chunks), kv))
            | "GroupByChunk" >> beam.GroupByKey()
            | "WriteChunk" >> beam.ParDo(WriteChunk(self.out_dir))
            | "CollectChunks" >> beam.combiners.ToList()
            | "AddFinishedChunks" >> beam.Map(lambda written: list(written) + done)
            | "WriteManifest" >> beam.ParDo(_WriteFeatureManifest(self.out_dir, self.extra))
        )


# ----------------------------------------------------------------------------- resume


def finished_chunks(out_dir: str, plan: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Chunks a previous run of the *same* plan wrote (complete files only: they appear by rename).
    Records ``plan`` first, so that a killed run leaves it for its rerun; another plan finishes nothing."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    if not record_plan(out_dir, plan):
        return {}
    done: dict[int, dict[str, Any]] = {}
    for index in range(plan["num_chunks"]):
        entry = _read_sidecar(out_dir, index)  # written after its chunk: present = the chunk is complete
        if entry is not None and fs.exists(fsspec.core.url_to_fs(sh.join_url(out_dir, chunk_name(index)))[1]):
            done[index] = entry
    return done


# ----------------------------------------------------------------------------- the job


def _plan(inputs: Sequence[str], tokenizers: str, *, frames_per_window: int | None, max_frames: int | None,
          seed: int, window_seconds: float, dtype: str, chunk_frames: int) -> dict[str, Any]:
    shard_urls, files = split_inputs(inputs)
    if not shard_urls and not files:
        raise ValueError(f"no audio shards or audio files found in {list(inputs)}")
    window = int(round(window_seconds * SAMPLE_RATE))
    total_frames, total_windows = 0, 0
    for _, (windows, seconds) in _shard_window_counts(shard_urls).items():
        total_windows += windows
        total_frames += windows * (int(round((seconds or window_seconds) * SAMPLE_RATE)) // SEMANTIC_HOP)
    for uri in files:
        windows = _file_windows(uri, window, window)
        total_windows += windows
        total_frames += windows * (window // SEMANTIC_HOP)
    fraction = keep_fraction(total_frames, frames_per_window, window // SEMANTIC_HOP, max_frames)
    expected = fraction * total_frames
    digest = hashlib.sha256("\n".join(shard_urls + ["--"] + files).encode()).hexdigest()
    return {
        "kind": FEATURES_KIND, "schema": FEATURES_SCHEMA, "inputs_sha256": digest, "shards_in": len(shard_urls),
        "files_in": len(files), "windows_in": total_windows, "frames_in": total_frames, "window": window,
        "frames_per_window": frames_per_window, "max_frames": max_frames, "keep_fraction": fraction, "seed": seed,
        "dtype": dtype, "expected_frames": int(round(expected)),
        "num_chunks": max(1, math.ceil(expected / chunk_frames)), "feature_model": feature_model_id(tokenizers),
        "_shard_urls": shard_urls, "_files": files,
    }


def build_sample_features_pipeline(p: beam.Pipeline, plan: dict[str, Any], out_dir: str, tokenizers: str, *,
                                   device: str = "cpu", progress_path: str | None = None) -> None:
    """Add the job to ``p`` for a plan made by :func:`run_sample_features` (inputs listed in it)."""
    public = {k: v for k, v in plan.items() if not k.startswith("_")}
    done = finished_chunks(out_dir, public)
    windows, dead = [], []
    if plan["_shard_urls"]:
        shards = (p | "CreateShards" >> beam.Create(plan["_shard_urls"])
                  | "ReadAudioShard" >> beam.ParDo(ReadAudioShard(progress_path)).with_outputs(DEAD, main="ok"))
        windows.append(shards.ok)
        dead.append(shards[DEAD])
    if plan["_files"]:
        window = plan["window"]
        # streamed block by block: a long file never sits in memory whole
        read = (p | "CreateFiles" >> beam.Create(plan["_files"])
                | "ReadWindows" >> beam.ParDo(ReadWindows(window, window, SAMPLE_RATE, progress_path)).with_outputs(
                    DEAD, main="ok"))
        windows.append(read.ok)
        dead.append(read[DEAD])
    selected = (
        tuple(windows) | "FlattenWindows" >> beam.Flatten()
        | "SkipFinishedChunks" >> beam.ParDo(SkipFinishedShards(done, plan["num_chunks"]))
        | "SelectFrames" >> beam.ParDo(SelectFrames(plan["keep_fraction"], plan["seed"])).with_outputs(DEAD, main="ok")
    )
    dead.append(selected[DEAD])
    features = (
        selected.ok
        | "Batch" >> beam.BatchElements(min_batch_size=BATCH, max_batch_size=BATCH)
        | "ComputeFeatures" >> beam.ParDo(ComputeFeatures(tokenizers, plan["dtype"], device, progress_path)).with_outputs(
            DEAD, main="ok")
    )
    dead.append(features[DEAD])
    extra = {"plan": public, "feature_model": plan["feature_model"], "keep_fraction": plan["keep_fraction"]}
    _ = features.ok | "WriteChunks" >> WriteFeatureChunks(out_dir, plan["num_chunks"], extra, list(done.values()))
    _ = tuple(dead) | "FlattenDead" >> beam.Flatten() | "DeadLetters" >> WriteDeadLetters(out_dir)


def run_sample_features(
    inputs: Sequence[str],
    out_dir: str,
    tokenizers: str,
    *,
    frames_per_window: int | None = None,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
    seed: int = 0,
    beam_args: Sequence[str] | None = None,
    window_seconds: float = 10.0,
    dtype: str = "float16",
    chunk_frames: int = DEFAULT_CHUNK_FRAMES,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Sample semantic features of a corpus into ``features-NNNNNN.npy`` chunks in ``out_dir``.

    ``inputs``: audio shard folders / ``.tar`` URLs (from ``prepare-audio``) and/or audio files, folders,
    globs (cut into ``window_seconds`` windows). Every window keeps the same fraction of its frames:
    ``frames_per_window`` of them (None: all), lowered so that about ``max_frames`` are kept in all
    (None: no cap). ``tokenizers`` is the checkpoint folder whose semantic feature model is used (ours
    or the pretrained one ``backends.json`` names). Returns (and writes) ``stats.json``.
    """
    if frames_per_window is not None and frames_per_window < 1:
        raise ValueError(f"frames_per_window must be >= 1, got {frames_per_window}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    out_dir = str(out_dir)
    plan = _plan(inputs, str(tokenizers), frames_per_window=frames_per_window, max_frames=max_frames, seed=seed,
                 window_seconds=window_seconds, dtype=dtype, chunk_frames=chunk_frames)
    options = build_pipeline_options(beam_args)
    local = is_local_runner(options)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="musiclm-progress-") as tmp:
        progress_path = os.path.join(tmp, "progress.log") if local else None
        pipeline = beam.Pipeline(options=options)
        build_sample_features_pipeline(pipeline, plan, out_dir, str(tokenizers), device=device,
                                       progress_path=progress_path)
        with ProgressMonitor(progress_path or os.devnull, total_files=plan["shards_in"] + plan["files_in"],
                             desc="sample features", enabled=progress and local):
            result = pipeline.run()
            result.wait_until_finish()
    wall = time.time() - start
    manifest = read_feature_manifest(out_dir)
    dead = sh.read_dead_letters(out_dir)
    stats = {
        "shards_in": plan["shards_in"],
        "files_in": plan["files_in"],
        "windows_in": plan["windows_in"],
        "frames_in": plan["frames_in"],
        "keep_fraction": plan["keep_fraction"],
        "expected_frames": plan["expected_frames"],
        "frames": manifest["num_frames"],
        "dim": manifest["dim"],
        "dtype": manifest["dtype"],
        "chunks": manifest["num_shards"],
        "dead_letters": len(dead),
        "wall_seconds": round(wall, 3),
        "frames_per_second": round(manifest["num_frames"] / wall, 1) if wall > 0 else None,
        "feature_model": plan["feature_model"],
        "metrics": metric_totals(result),
    }
    sh.write_stats(out_dir, stats)
    return stats


# ----------------------------------------------------------------------------- reading the sample back


def read_feature_manifest(features_dir: str) -> dict[str, Any]:
    """The manifest of a feature sample; ValueError (one line) when the folder holds none."""
    manifest = sh.read_manifest(str(features_dir))
    if manifest is None or manifest.get("kind") != FEATURES_KIND:
        raise ValueError(f"{features_dir} holds no feature sample (run `run_sample_features` / `musiclm fit` first)")
    return manifest


def load_chunk(url: str) -> np.ndarray:
    """One chunk ``[n, D]``: memory-mapped when local (pages are read as rows are used), read whole otherwise."""
    if sh.is_local_url(url):
        return np.load(url.removeprefix("file://"), mmap_mode="r", allow_pickle=False)
    with fsspec.open(url, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def iter_feature_batches(features_dir: str, *, batch_size: int = 4096, epoch: int = 0, seed: int = 0,
                         shuffle: bool = True) -> Iterator[Any]:
    """The frames of a feature sample as float32 ``[n, D]`` torch batches, one chunk in memory at a time.
    ``shuffle``: chunks in an order drawn from (seed, epoch), rows shuffled within each chunk."""
    import torch

    manifest = read_feature_manifest(features_dir)
    names = [c["name"] for c in manifest["shards"]]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(names)) if shuffle else np.arange(len(names))
    for i in order:
        chunk = load_chunk(sh.join_url(str(features_dir), names[i]))  # [n, D] float16
        rows = rng.permutation(chunk.shape[0]) if shuffle else np.arange(chunk.shape[0])
        for start in range(0, len(rows), batch_size):
            index = np.sort(rows[start : start + batch_size])  # sorted: sequential reads of the memory map
            yield torch.from_numpy(np.asarray(chunk[index], dtype=np.float32))  # [b, D]
        del chunk
