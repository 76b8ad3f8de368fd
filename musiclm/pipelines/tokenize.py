"""Beam job: an audio corpus -> token shards (A, S, M_A per crop window, and melody tokens when the
tokenizer folder has a melody tokenizer) for the three stages.

    Create(uris) -> ReadWindows -> BatchElements -> Tokenize -> AssignShard -> GroupByKey -> WriteShard
                        |  dead letters (per file)                    |  dead letters (per window)           |
                        +-------------------------+-------------------+                                      v
                                                  v                                                     manifest.json
                                          dead_letter.jsonl                                (+ stats.json after the run)

Every input ends up either in a shard or in ``dead_letter.jsonl`` with a reason. Files are
validated one by one *before* batching; the Tokenize step batches windows for speed and, should a
batch fail, retries its windows one by one so that only the culprit is dead-lettered. The
tokenizers are loaded once per worker in ``DoFn.setup``. (Batching is fixed-size within a
bundle; a runner that cuts bundles differently may flip a float near-tie between two codes, in
which case the shard's bytes change and WriteShard rewrites it — never a partial file.)

Every sample's ``json`` records the tokenizers that made it: ``tokenizers`` (artifact ids) and
``token_info`` (per role: backend, version, ids; and the token rates, e.g. EnCodec's 75 Hz x 8 x
1024), as do ``plan.json`` and ``manifest.json``; stage training refuses shards whose ``token_info``
differ. A worker whose tokenizers do not match the driver's plan refuses to start (never mixed shards).

Melody tokens (appendix C) are optional: when ``CKPT_DIR`` holds ``melody/`` and ``melody_rvq/``
(``musiclm.tokenizers.melody.has_melody``), every sample also carries ``melody.npy`` (int16 ``[Fm, Qmel]``:
one row per 4-s window with a 3-s hop of the crop window, 3 for 10 s, 9 for 30 s) and ``token_info["melody"]``
records the melody tokenizer (ids, codebooks, framing); without them the shards are exactly as before.

The crop window is the semantic stage's training crop (10 s in ``tiny``, the paper's 30 s in
``paper``), with hop = window, so a 10.0-s clip yields exactly one window in ``tiny``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from musiclm.constants import SAMPLE_RATE
from musiclm.data import shards as sh
from musiclm.pipelines.prepare_audio import (
    DEAD,
    NAMESPACE,
    ReadWindows,
    SkipFinishedShards,
    WriteDeadLetters,
    WriteShards,
    caption_lookup,
    default_num_shards,
    expand_inputs,
    finished_shards,
    job_plan,
    run_job,
    window_metadata,
)
from musiclm.pipelines.progress import record_progress

MAX_BATCH = 8


def default_window_seconds(preset: str) -> float:
    """The crop window for a tokenizer preset: the semantic stage's training crop of that preset. Tokenizers
    that are all pretrained have no preset of ours: the `paper` crop (the user may pass another)."""
    from musiclm.models.stages import PRESETS, StageConfig

    return float(StageConfig.preset("semantic", preset if preset in PRESETS else "paper").crop_seconds)


class Tokenize(beam.DoFn):
    """A batch of windows -> token samples ``{"__key__", "json", "acoustic", "semantic", "mulan"}`` (and
    ``"melody"`` when the tokenizer folder has a melody tokenizer).

    The TokenizerBundle is loaded in ``setup`` (once per DoFn instance, not per element). A failing
    batch is retried window by window; a window that still fails becomes a dead letter.
    """

    def __init__(self, ckpt_dir: str, preset: str | None, captions_path: str | None,
                 tokenizer_ids: dict[str, str] | None, progress_path: str | None = None,
                 token_info: dict[str, Any] | None = None):
        self.ckpt_dir = ckpt_dir
        self.preset = preset
        self.captions_path = captions_path
        self.tokenizer_ids = tokenizer_ids  # None: those of the loaded bundle
        self.token_info = token_info  # the driver's plan; None: that of the loaded bundle
        self.progress_path = progress_path
        self.tokenized = Metrics.counter(NAMESPACE, "windows_tokenized")
        self.failed = Metrics.counter(NAMESPACE, "windows_dead")
        self.audio_ms = Metrics.counter(NAMESPACE, "audio_ms_tokenized")

    def setup(self) -> None:
        # no global torch.set_grad_enabled(False) here: the in-process runner shares the caller's thread
        # state; the bundle's tokenize methods run under no_grad themselves
        from musiclm.tokenizers.bundle import TokenizerBundle

        self.bundle = TokenizerBundle.load(self.ckpt_dir, self.preset)
        if self.token_info is not None and self.bundle.token_info != self.token_info:
            # the folder changed since the job was planned, or this worker runs another musiclm version
            raise RuntimeError(
                f"the tokenizers in {self.ckpt_dir} on this worker are not those the job was planned with "
                f"(plan vs worker: {sh.describe_difference(self.token_info, self.bundle.token_info)}): rerun the job"
            )
        self.token_info = self.bundle.token_info
        self.tokenizer_ids = self.tokenizer_ids if self.tokenizer_ids is not None else self.bundle.ids
        self.lookup = caption_lookup(self.captions_path)

    def process(self, windows: list[dict[str, Any]]) -> Iterable[Any]:
        try:
            tokens = self.bundle.tokenize_windows([w["wav"] for w in windows])
            done = list(zip(windows, tokens))
        except Exception:
            done = []
            for window in windows:  # isolate the failing window(s)
                try:
                    done.append((window, self.bundle.tokenize_window(window["wav"])))
                except Exception as err:
                    self.failed.inc()
                    reason = f"tokenizing the window at {window['start']:.2f} s failed: {type(err).__name__}: {err}"
                    yield beam.pvalue.TaggedOutput(DEAD, sh.dead_letter(window["uri"], reason, "tokenize"))
        seconds = 0.0
        for window, token in done:
            self.tokenized.inc()
            seconds += window["end"] - window["start"]
            yield {
                "__key__": window["key"],
                "json": window_metadata(window, self.lookup, tokenizers=self.tokenizer_ids, token_info=self.token_info),
                **token,
            }
        self.audio_ms.inc(int(round(seconds * 1000)))
        record_progress(self.progress_path, seconds=seconds)


def build_tokenize_pipeline(
    p: beam.Pipeline,
    inputs: Sequence[str],
    out_dir: str,
    ckpt_dir: str,
    captions_path: str | None = None,
    window_seconds: float | None = None,
    hop_seconds: float | None = None,
    num_shards: int | None = None,
    *,
    progress_path: str | None = None,
    max_batch_size: int = MAX_BATCH,
) -> beam.PCollection:
    """Add the tokenization job to ``p``; returns the manifest PCollection.

    ``inputs`` are files, folders or globs on any fsspec URL; ``window_seconds`` None = the semantic
    stage's crop of the tokenizers' preset; ``hop_seconds`` None = the window (no overlap).
    """
    from musiclm.tokenizers.bundle import TokenizerBundle, ids_from_token_info

    uris = expand_inputs(inputs)
    preset = TokenizerBundle.read_preset(ckpt_dir)
    token_info = TokenizerBundle.read_token_info(ckpt_dir)  # hashes the weights once, here on the driver
    ids = ids_from_token_info(token_info)
    window_seconds = window_seconds or default_window_seconds(preset)
    window = int(round(window_seconds * SAMPLE_RATE))
    hop = int(round((hop_seconds or window_seconds) * SAMPLE_RATE))
    num_shards = num_shards or default_num_shards(len(uris))
    done = finished_shards(out_dir, sh.TOKEN_SHARD_PREFIX, job_plan("tokens", uris, window, hop, num_shards,
                                                                   tokenizers=ids, token_info=token_info,
                                                                   captions=captions_path))
    read = (
        p
        | "Create" >> beam.Create(uris)
        | "ReadWindows" >> beam.ParDo(ReadWindows(window, hop, SAMPLE_RATE, progress_path)).with_outputs(DEAD, main="ok")
    )
    tokenized = (
        read.ok
        | "SkipFinishedShards" >> beam.ParDo(SkipFinishedShards(done, num_shards))
        # fixed-size batches (the remainder at the end of a bundle): no adaptive ramp-up from 1
        | "Batch" >> beam.BatchElements(min_batch_size=max_batch_size, max_batch_size=max_batch_size)
        | "Tokenize" >> beam.ParDo(
            Tokenize(str(ckpt_dir), preset, captions_path, ids, progress_path, token_info=token_info)
        ).with_outputs(DEAD, main="samples")
    )
    manifest = tokenized.samples | "WriteShards" >> WriteShards(
        out_dir, sh.TOKEN_SHARD_PREFIX, num_shards, kind="tokens", tokenizers=ids,
        extra={"preset": preset, "window_seconds": window_seconds, "hop_seconds": hop_seconds or window_seconds,
               "sample_rate": SAMPLE_RATE, "token_info": token_info},
        done=done,
    )
    _ = (read[DEAD], tokenized[DEAD]) | "FlattenDead" >> beam.Flatten() | "DeadLetters" >> WriteDeadLetters(out_dir)
    return manifest


def run_tokenize(
    inputs: Sequence[str],
    out_dir: str,
    ckpt_dir: str,
    captions: str | None = None,
    beam_args: Sequence[str] | None = None,
    progress: bool = True,
    *,
    window_seconds: float | None = None,
    hop_seconds: float | None = None,
    num_shards: int | None = None,
) -> dict[str, Any]:
    """Tokenize a corpus into ``tokens-000000.tar`` shards in ``out_dir``; returns (and writes) the stats.

    ``beam_args`` are ordinary Beam options (``--runner DataflowRunner --project ...``); without
    ``--runner`` the job runs in-process (FnApiRunner).
    """
    from musiclm.tokenizers.bundle import TokenizerBundle

    uris = expand_inputs(inputs)
    out_dir = str(out_dir)
    window_seconds = window_seconds or default_window_seconds(TokenizerBundle.read_preset(ckpt_dir))

    def build(p: beam.Pipeline, progress_path: str | None) -> None:
        build_tokenize_pipeline(p, inputs, out_dir, str(ckpt_dir), captions, window_seconds, hop_seconds, num_shards,
                                progress_path=progress_path)

    return run_job(build, uris=uris, out_dir=out_dir, window_seconds=window_seconds, beam_args=beam_args,
                   progress=progress, desc="tokenize")
