"""Beam job: a raw audio corpus -> FLAC audio shards (24 kHz mono crops) for tokenizer training.

    Create(uris) -> ReadWindows -> MakeAudioSample -> AssignShard -> GroupByKey -> WriteShard
                        |  dead letters (per file or window, before any batching)                 |
                        +-----------------------------> dead_letter.jsonl     manifest.json  <----+

This module also holds the pieces both Beam jobs share (input expansion, per-file validation
with tagged dead-letter output, windowing, deterministic shard writing, the finishing files);
``musiclm.pipelines.tokenize`` plugs its Tokenize step into the same skeleton.

Why this shape (see DESIGN.md, "Facts checked"): every file is decoded and validated in its own
ParDo, so one corrupt file never takes good neighbours into the dead letters (as a batched
``RunInference(...).with_exception_handling()`` would); shards are assigned from the sample key
and written by our own DoFn (temporary name, then rename; skipped when the bytes are already
there) because ``WriteToFiles(shards=N)`` is ignored on local runners.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import apache_beam as beam
import fsspec
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from musiclm.constants import SAMPLE_RATE, SHARD_SCHEMA_VERSION
from musiclm.data import shards as sh
from musiclm.pipelines.options import build_pipeline_options, is_local_runner
from musiclm.pipelines.progress import ProgressMonitor, record_progress

NAMESPACE = "musiclm"
DEAD = "dead"  # tag of the dead-letter outputs

AUDIO_EXTENSIONS = (
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".snd", ".caf", ".w64",
)
_GLOB_CHARS = set("*?[")


# ----------------------------------------------------------------------------- inputs


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files, folders (searched recursively for audio extensions) and glob patterns, on any fsspec URL,
    as a sorted, de-duplicated list of URIs.

    A file named explicitly is kept even when it does not exist: it then lands in the dead letters
    with "file not found", so every input the user gave is accounted for. Raises ValueError when
    nothing at all is found (a wrong folder is a user mistake, not an empty corpus).
    """
    found: set[str] = set()
    for item in inputs:
        text = str(item)
        fs, path = fsspec.core.url_to_fs(text)
        local = sh.is_local_url(text)

        def uri(p: str, fs: fsspec.AbstractFileSystem = fs, local: bool = local) -> str:
            return p if local else fs.unstrip_protocol(p)

        if fs.isfile(path):
            found.add(uri(path))
        elif fs.isdir(path):
            found.update(uri(p) for p in fs.find(path) if p.lower().endswith(AUDIO_EXTENSIONS))
        elif any(c in _GLOB_CHARS for c in path):
            for match in fs.glob(path):
                if fs.isdir(match):
                    found.update(uri(p) for p in fs.find(match) if p.lower().endswith(AUDIO_EXTENSIONS))
                else:
                    found.add(uri(match))
        else:
            found.add(uri(path))  # missing: kept, so that it is reported in the dead letters
    if not found:
        raise ValueError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) found in {list(inputs)}")
    return sorted(found)


def default_num_shards(num_files: int) -> int:
    """At least 4 shards (so training workers x loader workers each get some), one more per 50 files."""
    return max(4, math.ceil(num_files / 50))


# ----------------------------------------------------------------------------- captions


def caption_lookup(captions_path: str | None) -> Callable[[str], tuple]:
    """uri -> (caption, aspects, extra) from a captions file (``musiclm.data.captions``); ("", [], {})
    without one. ``extra`` holds the row's ``melody_group`` when it has one (melody pairs)."""
    if not captions_path:
        return lambda uri: ("", [], {})
    from musiclm.data.captions import caption_for, load_captions

    table = load_captions(captions_path)

    def lookup(uri: str) -> tuple[str, list[str], dict[str, str]]:
        entry = caption_for(table, uri)  # matched by file stem; None for a clip without caption
        if entry is None:
            return "", [], {}
        extra = {"melody_group": entry["melody_group"]} if "melody_group" in entry else {}
        return entry["caption"], list(entry["aspects"]), extra

    return lookup


# ----------------------------------------------------------------------------- shared DoFns


def _window_element(uri: str, start: int, window_samples: int, sample_rate: int, wav: np.ndarray) -> dict[str, Any]:
    start_s = start / sample_rate
    return {"key": sh.sample_key(uri, start_s), "uri": uri, "start": start_s,
            "end": (start + window_samples) / sample_rate, "wav": wav}


class ReadWindows(beam.DoFn):
    """One file -> its crop windows ``{"key", "uri", "start", "end", "wav"}``, streamed; problems -> dead letters.

    The file is decoded block by block (``musiclm.audio.AudioStream``) and each full window is
    emitted as soon as its samples are in. The steps after this one are fused with it and take the
    windows one at a time (Tokenize batches a few), so no step holds a long file: memory is a few
    blocks and windows whatever the file's length. Per file and before any batching, so one bad
    input never fails its neighbours. Dead letters (tag ``DEAD``):

    - the file as a whole (stage ``read``): missing, empty, not audio, truncated header, shorter
      than one window, or non-finite samples in every window;
    - one window (stage ``window``, with its ``start`` in seconds): it overlaps non-finite samples;
      the file's other windows go on;
    - the rest of a file that breaks off after some good windows (stage ``read``, with the
      ``start`` of the first window lost): the windows before the break are kept.
    """

    def __init__(self, window_samples: int, hop_samples: int, sample_rate: int = SAMPLE_RATE,
                 progress_path: str | None = None, block_seconds: float | None = None):
        self.window_samples = window_samples
        self.hop_samples = hop_samples
        self.sample_rate = sample_rate
        self.progress_path = progress_path
        self.block_seconds = block_seconds
        self.ok = Metrics.counter(NAMESPACE, "files_ok")
        self.dead = Metrics.counter(NAMESPACE, "files_dead")
        self.audio_ms = Metrics.counter(NAMESPACE, "audio_ms_read")
        self.windows = Metrics.counter(NAMESPACE, "windows")
        self.bad_windows = Metrics.counter(NAMESPACE, "windows_non_finite")

    def process(self, uri: str) -> Iterable[Any]:
        from musiclm.audio import AudioError, AudioStream
        from musiclm.audio.io import DEFAULT_BLOCK_SECONDS

        stream = AudioStream(uri, self.sample_rate, self.block_seconds or DEFAULT_BLOCK_SECONDS)
        good, next_start = 0, 0
        bad: list[dict[str, Any]] = []  # held back until a good window shows the file is not bad throughout
        try:
            for window in stream.windows(self.window_samples, self.hop_samples):
                next_start = window.start + self.hop_samples
                if window.error is not None:
                    self.bad_windows.inc()
                    bad.append({**sh.dead_letter(uri, window.error, "window"),
                                "start": round(window.start / self.sample_rate, 6)})
                    if good:
                        yield from self._tagged(bad)
                        bad = []
                    continue
                if bad:
                    yield from self._tagged(bad)
                    bad = []
                good += 1
                self.windows.inc()
                yield _window_element(uri, window.start, self.window_samples, self.sample_rate, window.wav)
        except Exception as err:  # AudioError, or anything else about this one file
            reason = str(err) if isinstance(err, AudioError) else f"{type(err).__name__}: {err}"
            if good == 0:  # nothing usable before the break: the file as a whole
                yield from self._dead(uri, reason + (" (and non-finite samples in every window before)" if bad else ""))
                return
            start = round(next_start / self.sample_rate, 6)
            yield from self._tagged([{**sh.dead_letter(uri, f"{reason}; windows from {start:.2f} s on are lost", "read"),
                                      "start": start}])
        else:
            if good == 0:
                have, need = stream.num_samples / self.sample_rate, self.window_samples / self.sample_rate
                reason = ("audio contains non-finite samples (NaN or Inf) in every window" if bad
                          else f"shorter than one window ({have:.2f} s < {need:.2f} s)")
                yield from self._dead(uri, reason)
                return
        self.ok.inc()
        self.audio_ms.inc(int(1000 * stream.num_samples / self.sample_rate))
        record_progress(self.progress_path, files=1)

    @staticmethod
    def _tagged(records: list[dict[str, Any]]) -> Iterable[Any]:
        for record in records:
            yield beam.pvalue.TaggedOutput(DEAD, record)

    def _dead(self, uri: str, reason: str) -> Iterable[Any]:
        self.dead.inc()
        record_progress(self.progress_path, files=1, dead=1)
        yield beam.pvalue.TaggedOutput(DEAD, sh.dead_letter(uri, reason, "read"))


def window_metadata(window: dict[str, Any], lookup: Callable[[str], tuple], **extra: Any) -> dict:
    """The ``json`` member: source URI, window, caption, aspects, schema version (+ tokenizer ids), and
    ``melody_group`` when the clip's caption row has one (a lookup may return just (caption, aspects))."""
    caption, aspects, *rest = lookup(window["uri"])
    return {
        "key": window["key"],
        "source": window["uri"],
        "start": round(window["start"], 6),
        "end": round(window["end"], 6),
        "caption": caption,
        "aspects": aspects,
        **(rest[0] if rest else {}),
        "schema": SHARD_SCHEMA_VERSION,
        **extra,
    }


class MakeAudioSample(beam.DoFn):
    """A window -> an audio sample ``{"__key__", "json", "flac"}`` (16-bit FLAC, 24 kHz mono)."""

    def __init__(self, captions_path: str | None, sample_rate: int = SAMPLE_RATE, progress_path: str | None = None):
        self.captions_path = captions_path
        self.sample_rate = sample_rate
        self.progress_path = progress_path

    def setup(self) -> None:
        self.lookup = caption_lookup(self.captions_path)

    def process(self, window: dict[str, Any]) -> Iterable[dict[str, Any]]:
        from musiclm.audio import encode_flac

        record_progress(self.progress_path, seconds=window["end"] - window["start"])
        yield {
            "__key__": window["key"],
            "json": window_metadata(window, self.lookup, sample_rate=self.sample_rate),
            "flac": encode_flac(window["wav"], self.sample_rate),
        }


class WriteShard(beam.DoFn):
    """``(shard index, samples)`` -> the shard file, written atomically; yields its manifest entry.

    A shard whose file already holds exactly these bytes is not rewritten (reruns and resumed runs).
    """

    def __init__(self, out_dir: str, prefix: str):
        self.out_dir = out_dir
        self.prefix = prefix
        self.written = Metrics.counter(NAMESPACE, "shards_written")
        self.skipped = Metrics.counter(NAMESPACE, "shards_unchanged")

    def process(self, element: tuple[int, Iterable[dict[str, Any]]]) -> Iterable[dict[str, Any]]:
        index, samples = element
        entry = sh.write_shard(sh.join_url(self.out_dir, sh.shard_name(self.prefix, index)), list(samples))
        (self.written if entry["written"] else self.skipped).inc()
        yield entry


class _WriteManifest(beam.DoFn):
    def __init__(self, out_dir: str, kind: str, tokenizers: dict[str, str] | None, extra: dict[str, Any]):
        self.out_dir, self.kind, self.tokenizers, self.extra = out_dir, kind, tokenizers, extra

    def process(self, entries: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        yield sh.write_manifest(self.out_dir, entries, kind=self.kind, tokenizers=self.tokenizers, extra=self.extra)


class _WriteDeadLetters(beam.DoFn):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def process(self, records: list[dict[str, str]]) -> Iterable[int]:
        yield sh.write_dead_letters(self.out_dir, records)


PLAN_FILE = "plan.json"


def record_plan(out_dir: str, plan: dict[str, Any]) -> bool:
    """Write ``plan`` to ``out_dir/plan.json`` (before the job runs, so that a killed job leaves it for its
    rerun) and say whether the previous run there had the same plan: only then may its outputs be kept."""
    import json

    fs, root = fsspec.core.url_to_fs(out_dir)
    plan_path = sh.join_url(root, PLAN_FILE)
    previous = None
    if fs.exists(plan_path):
        try:
            with fs.open(plan_path, "rb") as f:
                previous = json.loads(f.read())
        except ValueError:
            previous = None
    fs.makedirs(root, exist_ok=True)
    sh.write_bytes_atomic(sh.join_url(out_dir, PLAN_FILE), json.dumps(plan, indent=2, sort_keys=True).encode())
    return previous == plan


def finished_shards(out_dir: str, prefix: str, plan: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Shards a previous run of the *same* job (same inputs, windows, shard count, tokenizers) already wrote.

    Shards appear under their final name only when complete (temporary name, then rename), so an
    existing file is a finished shard. A different plan finishes nothing: everything is redone. The
    current plan is recorded before the job runs, so a killed job leaves it behind for its rerun.
    """
    import hashlib
    import io
    import tarfile

    fs, root = fsspec.core.url_to_fs(out_dir)
    if not record_plan(out_dir, plan):
        return {}
    done: dict[int, dict[str, Any]] = {}
    for index in range(plan["num_shards"]):
        name = sh.shard_name(prefix, index)
        path = sh.join_url(root, name)
        if not fs.exists(path):
            continue
        with fs.open(path, "rb") as f:
            data = f.read()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            keys = {m.name.split(".", 1)[0] for m in tar.getmembers()}
        done[index] = {"name": name, "samples": len(keys), "sha256": hashlib.sha256(data).hexdigest(),
                       "bytes": len(data), "written": False}
    return done


def job_plan(kind: str, uris: Sequence[str], window: int, hop: int, num_shards: int, **extra: Any) -> dict[str, Any]:
    """What determines a job's shards: rerunning the same plan may reuse finished shards."""
    import hashlib

    digest = hashlib.sha256("\n".join(sorted(uris)).encode()).hexdigest()
    return {"kind": kind, "inputs_sha256": digest, "inputs": len(uris), "window": window, "hop": hop,
            "num_shards": num_shards, "schema": SHARD_SCHEMA_VERSION, **extra}


class SkipFinishedShards(beam.DoFn):
    """Drops windows whose shard a previous run of the same job already wrote: no redone work."""

    def __init__(self, done: Iterable[int], num_shards: int):
        self.done, self.num_shards = frozenset(done), num_shards
        self.skipped = Metrics.counter(NAMESPACE, "windows_in_finished_shards")

    def process(self, window: dict[str, Any]) -> Iterable[dict[str, Any]]:
        if sh.shard_index(window["key"], self.num_shards) in self.done:
            self.skipped.inc()
            return
        yield window


class WriteShards(beam.PTransform):
    """Keyed samples -> shards: AssignShard (stable hash of the key) -> GroupByKey -> WriteShard -> manifest.

    ``done`` holds the manifest entries of shards finished by an earlier run (see ``finished_shards``);
    they are listed in the manifest without being rewritten.
    """

    def __init__(self, out_dir: str, prefix: str, num_shards: int, kind: str,
                 tokenizers: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                 done: dict[int, dict[str, Any]] | None = None):
        super().__init__()
        self.out_dir, self.prefix, self.num_shards = out_dir, prefix, num_shards
        self.kind, self.tokenizers, self.extra = kind, tokenizers, extra or {}
        self.done = list((done or {}).values())

    def expand(self, samples: beam.PCollection) -> beam.PCollection:
        num_shards, done = self.num_shards, self.done
        return (
            samples
            | "AssignShard" >> beam.Map(lambda s: (sh.shard_index(s["__key__"], num_shards), s))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(WriteShard(self.out_dir, self.prefix))
            | "CollectShards" >> beam.combiners.ToList()
            | "AddFinishedShards" >> beam.Map(lambda written: list(written) + done)
            | "WriteManifest" >> beam.ParDo(_WriteManifest(self.out_dir, self.kind, self.tokenizers, self.extra))
        )


class WriteDeadLetters(beam.PTransform):
    """All dead-letter PCollections -> one sorted ``dead_letter.jsonl`` (written even when empty)."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir

    def expand(self, dead: beam.PCollection) -> beam.PCollection:
        return (
            dead
            | "CollectDead" >> beam.combiners.ToList()
            | "WriteDeadLetterFile" >> beam.ParDo(_WriteDeadLetters(self.out_dir))
        )


# ----------------------------------------------------------------------------- running and stats


def metric_totals(result: Any) -> dict[str, int]:
    """Our Beam counters summed over steps (empty where a runner does not report them)."""
    totals: dict[str, int] = {}
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except Exception:  # some runners offer no metrics API
        return totals
    for counter in counters:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(value or 0)
    return totals


def run_job(
    build: Callable[[beam.Pipeline, str | None], None],
    *,
    uris: Sequence[str],
    out_dir: str,
    window_seconds: float,
    beam_args: Sequence[str] | None,
    progress: bool,
    desc: str,
) -> dict[str, Any]:
    """Run a pipeline built by ``build(p, progress_path)``, then write and return ``stats.json``."""
    options = build_pipeline_options(beam_args)
    fs, path = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(path, exist_ok=True)
    local = is_local_runner(options)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="musiclm-progress-") as tmp:
        progress_path = os.path.join(tmp, "progress.log") if local else None
        pipeline = beam.Pipeline(options=options)
        build(pipeline, progress_path)
        with ProgressMonitor(progress_path or os.devnull, total_files=len(uris), desc=desc,
                             enabled=progress and local):
            result = pipeline.run()
            result.wait_until_finish()
    wall = time.time() - start
    manifest = sh.read_manifest(out_dir) or {"num_samples": 0, "num_shards": 0}
    dead = sh.read_dead_letters(out_dir)
    # whole files only: a letter with a "start" is about part of a file whose other windows are in shards
    dead_files = {d["uri"] for d in dead if d["stage"] == "read" and "start" not in d}
    windows = int(manifest["num_samples"])
    audio_seconds = windows * window_seconds
    stats = {
        "files_in": len(uris),
        "files_ok": len(uris) - len(dead_files),
        "files_dead": len(dead_files),
        "dead_letters": len(dead),
        "windows": windows,
        "shards": int(manifest["num_shards"]),
        "audio_seconds": audio_seconds,
        "wall_seconds": round(wall, 3),
        "audio_seconds_per_second": round(audio_seconds / wall, 3) if wall > 0 else None,
        "files_per_second": round(len(uris) / wall, 3) if wall > 0 else None,
        "metrics": metric_totals(result),
    }
    sh.write_stats(out_dir, stats)
    return stats


def build_prepare_audio_pipeline(
    p: beam.Pipeline,
    inputs: Sequence[str],
    out_dir: str,
    *,
    captions_path: str | None = None,
    window_seconds: float = 10.0,
    hop_seconds: float | None = None,
    num_shards: int | None = None,
    progress_path: str | None = None,
) -> None:
    """Add the audio-shard job to ``p``; ``inputs`` are files, folders or globs on any fsspec URL."""
    uris = expand_inputs(inputs)
    window = int(round(window_seconds * SAMPLE_RATE))
    hop = int(round((hop_seconds or window_seconds) * SAMPLE_RATE))
    num_shards = num_shards or default_num_shards(len(uris))
    done = finished_shards(out_dir, sh.AUDIO_SHARD_PREFIX, job_plan("audio", uris, window, hop, num_shards,
                                                                   captions=captions_path))
    read = (
        p
        | "Create" >> beam.Create(uris)
        | "ReadWindows" >> beam.ParDo(ReadWindows(window, hop, SAMPLE_RATE, progress_path)).with_outputs(DEAD, main="ok")
    )
    _ = (
        read.ok
        | "SkipFinishedShards" >> beam.ParDo(SkipFinishedShards(done, num_shards))
        | "MakeAudioSample" >> beam.ParDo(MakeAudioSample(captions_path, SAMPLE_RATE, progress_path))
        | "WriteShards" >> WriteShards(
            out_dir, sh.AUDIO_SHARD_PREFIX, num_shards, kind="audio",
            extra={"sample_rate": SAMPLE_RATE, "window_seconds": window_seconds}, done=done,
        )
    )
    _ = read[DEAD] | "DeadLetters" >> WriteDeadLetters(out_dir)


def run_prepare_audio(
    inputs: Sequence[str],
    out_dir: str,
    captions: str | None = None,
    window_seconds: float = 10.0,
    hop_seconds: float | None = None,
    num_shards: int | None = None,
    beam_args: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Crop a corpus into FLAC audio shards ``audio-000000.tar`` in ``out_dir``; returns the stats."""
    if window_seconds <= 0 or (hop_seconds is not None and hop_seconds <= 0):
        raise ValueError("window_seconds and hop_seconds must be positive")
    uris = expand_inputs(inputs)
    out_dir = str(out_dir)

    def build(p: beam.Pipeline, progress_path: str | None) -> None:
        build_prepare_audio_pipeline(p, inputs, out_dir, captions_path=captions, window_seconds=window_seconds,
                                     hop_seconds=hop_seconds, num_shards=num_shards, progress_path=progress_path)

    return run_job(build, uris=uris, out_dir=out_dir, window_seconds=window_seconds, beam_args=beam_args,
                   progress=progress, desc="prepare audio")
