import hashlib
import json
import os
import uuid
from pathlib import Path

import apache_beam as beam
import fsspec
import numpy as np
import pytest
import soundfile as sf
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from musiclm.audio import encode_flac, load_audio, write_wav
from musiclm.data import shards as sh
from musiclm.pipelines.options import build_pipeline_options, is_local_runner, runner_name
from musiclm.pipelines.prepare_audio import (
    DEAD,
    ReadWindows,
    WriteShards,
    default_num_shards,
    expand_inputs,
    run_prepare_audio,
    window_metadata,
)

SR = 24000


def _tone(seconds: float, freq: float, sr: int = SR) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """Three good clips (one 16-kHz stereo, one in a sub-folder) and one of each kind of bad input."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "sub").mkdir()
    write_wav(str(root / "a.wav"), _tone(2.5, 220), SR)
    write_wav(str(root / "sub" / "b.wav"), _tone(1.0, 330), SR)
    stereo = np.stack([_tone(1.5, 440, 16000), _tone(1.5, 550, 16000)], axis=1)
    sf.write(str(root / "c.flac"), stereo, 16000)
    (root / "empty.wav").write_bytes(b"")
    (root / "corrupt.wav").write_bytes(os.urandom(2000))
    sf.write(str(root / "nan.wav"), np.full(SR, np.nan, np.float32), SR, subtype="FLOAT")
    write_wav(str(root / "short.wav"), _tone(0.5, 220), SR)
    (root / "notes.txt").write_text("not audio")
    captions = root.parent / f"{root.name}-captions.jsonl"
    captions.write_text(json.dumps({"file": "audio/a.wav", "caption": "a calm sine", "aspects": ["sine", "calm"]}) + "\n")
    return {"root": str(root), "missing": str(root / "missing.wav"), "captions": str(captions)}


def _pipeline() -> BeamTestPipeline:
    return BeamTestPipeline(options=build_pipeline_options([]))


# ----------------------------------------------------------------------------- options


def test_options_default_to_in_process_runner_and_pass_user_flags_through():
    options = build_pipeline_options([])
    assert runner_name(options) == "FnApiRunner" and is_local_runner(options)
    argv = ["--runner", "DataflowRunner", "--project", "p1", "--region", "europe-west4",
            "--temp_location", "gs://bucket/tmp", "--num_workers", "7"]
    options = build_pipeline_options(argv)
    everything = options.get_all_options()
    assert options.view_as(StandardOptions).runner == "DataflowRunner" and not is_local_runner(options)
    assert (everything["project"], everything["region"], everything["temp_location"], everything["num_workers"]) == (
        "p1", "europe-west4", "gs://bucket/tmp", 7)
    flink = build_pipeline_options(["--runner=FlinkRunner", "--flink_master=localhost:8081"])
    assert runner_name(flink) == "FlinkRunner" and flink.get_all_options()["flink_master"] == "localhost:8081"


# ----------------------------------------------------------------------------- inputs


def test_expand_inputs_folders_globs_missing_and_memory(corpus):
    root = corpus["root"]
    found = expand_inputs([root])
    assert found == sorted(found) and sorted(Path(u).name for u in found) == sorted(
        ["a.wav", "b.wav", "c.flac", "corrupt.wav", "empty.wav", "nan.wav", "short.wav"])
    assert expand_inputs([os.path.join(root, "*.flac"), corpus["missing"], root + "/sub"]) == sorted(
        [os.path.join(root, "c.flac"), corpus["missing"], os.path.join(root, "sub", "b.wav")])
    base = f"memory://corpus-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{base}/x/one.ogg", b"0")
    fs.pipe_file(f"{base}/x/readme.md", b"0")
    assert expand_inputs([base]) == ["memory:///" + base[len("memory://"):] + "/x/one.ogg"]
    with pytest.raises(ValueError, match="no audio files"):
        expand_inputs([os.path.join(root, "*.mp3")])
    assert default_num_shards(1) == 4 and default_num_shards(201) == 5


# ----------------------------------------------------------------------------- transforms


def test_read_windows_streams_each_file_and_dead_letters_files_and_windows(corpus, tmp_path):
    root = corpus["root"]
    nan_mid = _tone(4.0, 300)
    nan_mid[int(2.5 * SR)] = np.nan  # spoils the window [2 s, 3 s) only
    sf.write(str(tmp_path / "nan_mid.wav"), nan_mid, SR, subtype="FLOAT")
    flac = encode_flac(_tone(6.0, 250), SR)
    (tmp_path / "cut.flac").write_bytes(flac[: int(len(flac) * 0.6)])  # breaks off after a few windows
    uris = [*expand_inputs([root, corpus["missing"]]), str(tmp_path / "nan_mid.wav"), str(tmp_path / "cut.flac")]
    with _pipeline() as p:
        out = p | beam.Create(uris) | beam.ParDo(ReadWindows(SR, SR, block_seconds=0.3)).with_outputs(DEAD, main="ok")
        windows = out.ok | "Summ" >> beam.Map(lambda w: (Path(w["uri"]).name, w["start"], w["end"], w["wav"].shape[0]))
        assert_that(windows, equal_to([
            ("a.wav", 0.0, 1.0, SR), ("a.wav", 1.0, 2.0, SR), ("b.wav", 0.0, 1.0, SR), ("c.flac", 0.0, 1.0, SR),
            ("nan_mid.wav", 0.0, 1.0, SR), ("nan_mid.wav", 1.0, 2.0, SR), ("nan_mid.wav", 3.0, 4.0, SR),
            ("cut.flac", 0.0, 1.0, SR), ("cut.flac", 1.0, 2.0, SR), ("cut.flac", 2.0, 3.0, SR),
        ]), label="ok")
        reasons = out[DEAD] | beam.Map(lambda d: (Path(d["uri"]).name, d["stage"], d.get("start"), d["reason"]))
        assert_that(reasons, equal_to([
            ("corrupt.wav", "read", None, "not an audio file libsndfile can read (Format not recognised)"),
            ("empty.wav", "read", None, "empty file (0 bytes)"),
            ("missing.wav", "read", None, f"file not found: {corpus['missing']}"),
            ("nan.wav", "read", None, "audio contains non-finite samples (NaN or Inf) in every window"),
            ("short.wav", "read", None, "shorter than one window (0.50 s < 1.00 s)"),
            ("nan_mid.wav", "window", 2.0, "non-finite samples (NaN or Inf) in the window at 2.00 s"),
            ("cut.flac", "read", 3.0,
             "truncated or corrupt audio (Error : flac decoder lost sync); windows from 3.00 s on are lost"),
        ]), label="dead")


def test_read_windows_equal_whole_file_crops(corpus):
    # what the streamed job shards is exactly what decoding the file whole and cropping it gives
    uri = os.path.join(corpus["root"], "c.flac")  # 16-kHz stereo: downmixed and resampled on the fly
    whole = load_audio(uri)
    with _pipeline() as p:
        out = p | beam.Create([uri]) | beam.ParDo(ReadWindows(SR // 2, SR // 4, block_seconds=0.2)).with_outputs(DEAD, main="ok")
        got = out.ok | beam.Map(lambda w: (int(round(w["start"] * SR)), w["wav"].tobytes()))
        assert_that(got, equal_to([(start, whole[start : start + SR // 2].tobytes())
                                   for start in range(0, len(whole) - SR // 2 + 1, SR // 4)]))


def test_write_shards_groups_by_key_hash(tmp_path):
    samples = [{"__key__": sh.sample_key(f"/c/{i}.wav", 0.0), "json": {"i": i},
                "mulan": np.full(12, i, np.int16)} for i in range(12)]
    expected = {}
    for s in samples:
        expected.setdefault(sh.shard_index(s["__key__"], 3), []).append(s["__key__"])
    with _pipeline() as p:
        manifest = p | beam.Create(samples) | WriteShards(str(tmp_path), "tokens", 3, kind="tokens")
        counts = manifest | beam.Map(lambda m: sorted((e["name"], e["samples"]) for e in m["shards"]))
        assert_that(counts, equal_to([sorted((sh.shard_name("tokens", i), len(k)) for i, k in expected.items())]))
    for index, keys in expected.items():
        got = [s["__key__"] for s in sh.iter_samples([str(tmp_path / sh.shard_name("tokens", index))])]
        assert got == sorted(keys)


# ----------------------------------------------------------------------------- the job


def _shard_files(out: Path) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in sorted(out.glob("audio-*.tar"))}


def test_prepare_audio_job_dead_letters_reruns_and_resume(corpus, tmp_path):
    out = tmp_path / "audio"
    stats = run_prepare_audio([corpus["root"], corpus["missing"]], str(out), captions=corpus["captions"],
                              window_seconds=1.0, progress=False)
    assert (stats["files_in"], stats["files_ok"], stats["files_dead"], stats["windows"]) == (8, 3, 5, 2 + 1 + 1)
    assert stats["audio_seconds"] == 4.0 and stats["metrics"]["files_ok"] == 3
    assert json.loads((out / "stats.json").read_text())["windows"] == 4
    dead = sh.read_dead_letters(str(out))
    assert sorted(Path(d["uri"]).name for d in dead) == ["corrupt.wav", "empty.wav", "missing.wav", "nan.wav", "short.wav"]
    samples = list(sh.iter_samples(str(out), prefix="audio"))
    # every input is accounted for: in a shard or in the dead letters
    sources = {Path(s["json"]["source"]).name for s in samples}
    assert sources | {Path(d["uri"]).name for d in dead} == {Path(u).name for u in expand_inputs([corpus["root"], corpus["missing"]])}
    by_key = {s["__key__"]: s for s in samples}
    a0 = by_key[sh.sample_key(os.path.join(corpus["root"], "a.wav"), 0.0)]
    assert a0["json"]["start"] == 0.0 and a0["json"]["end"] == 1.0 and a0["wav"].shape == (SR,)
    assert (a0["json"]["caption"], a0["json"]["aspects"]) == ("a calm sine", ["sine", "calm"])
    assert "melody_group" not in a0["json"]  # only rows that carry one put it in the shards
    np.testing.assert_allclose(a0["wav"], _tone(2.5, 220)[:SR], atol=1e-4)
    c1 = by_key[sh.sample_key(os.path.join(corpus["root"], "c.flac"), 0.0)]
    assert (c1["json"]["caption"], c1["json"]["aspects"]) == ("", [])  # no caption for this clip
    assert c1["wav"].shape == (SR,)  # 16-kHz stereo became 24-kHz mono
    manifest = sh.read_manifest(str(out))
    assert manifest["kind"] == "audio" and manifest["num_samples"] == 4
    for entry in manifest["shards"]:
        assert hashlib.sha256((out / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]

    # a rerun writes the same bytes and leaves every file in place
    before = _shard_files(out)
    digests = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in before}
    run_prepare_audio([corpus["root"], corpus["missing"]], str(out), captions=corpus["captions"],
                      window_seconds=1.0, progress=False)
    after = _shard_files(out)
    assert {n: (s.st_ino, s.st_mtime_ns) for n, s in after.items()} == {n: (s.st_ino, s.st_mtime_ns) for n, s in before.items()}

    # resume: delete one shard; only it is written again, with identical bytes
    victim = sorted(before)[0]
    (out / victim).unlink()
    stats = run_prepare_audio([corpus["root"], corpus["missing"]], str(out), captions=corpus["captions"],
                              window_seconds=1.0, progress=False)
    assert stats["metrics"]["shards_written"] == 1
    assert stats["metrics"].get("shards_unchanged", 0) == 0  # finished shards are not even re-read ...
    # (the keys hash the temporary corpus path: when one shard holds every window, none is skipped and Beam
    # reports no counter at all)
    skipped = stats["metrics"].get("windows_in_finished_shards", 0)
    assert skipped == 4 - sh.read_manifest(str(out))["shards"][0]["samples"]
    assert sh.read_manifest(str(out)) == manifest  # ... yet listed in the manifest as before
    again = _shard_files(out)
    for name, st in again.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digests[name]
        if name != victim:
            assert (st.st_ino, st.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)


def test_prepare_audio_on_memory_urls():
    base = f"memory://job-{uuid.uuid4().hex}"
    write_wav(f"{base}/in/x.wav", _tone(2.0, 200), SR)
    fsspec.filesystem("memory").pipe_file(f"{base}/in/bad.wav", b"RIFF....junk")
    stats = run_prepare_audio([f"{base}/in"], f"{base}/out", window_seconds=1.0, num_shards=2, progress=False)
    assert (stats["files_ok"], stats["files_dead"], stats["windows"]) == (1, 1, 2)
    samples = list(sh.iter_samples(f"{base}/out", prefix="audio"))
    assert sorted(s["json"]["start"] for s in samples) == [0.0, 1.0]
    assert all(s["json"]["source"].startswith("memory://") for s in samples)
    assert [Path(d["uri"]).name for d in sh.read_dead_letters(f"{base}/out")] == ["bad.wav"]


def test_window_metadata_takes_the_melody_group_from_the_caption_row():
    window = {"key": "k", "uri": "memory://x/a.wav", "start": 0.0, "end": 1.0}
    plain = window_metadata(window, lambda uri: ("a tune", ["tune"]))  # a lookup of before melody groups
    grouped = window_metadata(window, lambda uri: ("a tune", ["tune"], {"melody_group": "song 1"}), tokenizers={})
    assert "melody_group" not in plain and grouped["melody_group"] == "song 1"
    assert {k: v for k, v in grouped.items() if k not in ("melody_group", "tokenizers")} == plain


def test_prepare_audio_carries_melody_groups_from_a_pairs_manifest():
    base = f"memory://pairs-{uuid.uuid4().hex}"
    write_wav(f"{base}/in/cover_a.wav", _tone(1.0, 220), SR)
    write_wav(f"{base}/in/hum_a.wav", _tone(1.0, 440), SR)
    write_wav(f"{base}/in/other.wav", _tone(1.0, 330), SR)
    rows = [{"audio": "in/cover_a.wav", "melody_group": "song a", "caption": "a cover"},
            {"audio": "in/hum_a.wav", "melody_group": "song a"}]
    with fsspec.open(f"{base}/pairs.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    run_prepare_audio([f"{base}/in"], f"{base}/out", captions=f"{base}/pairs.jsonl", window_seconds=1.0,
                      num_shards=1, progress=False)
    meta = {Path(s["json"]["source"]).stem: s["json"] for s in sh.iter_samples(f"{base}/out", prefix="audio")}
    assert {k: m.get("melody_group") for k, m in meta.items()} == {"cover_a": "song a", "hum_a": "song a", "other": None}
    assert (meta["cover_a"]["caption"], meta["hum_a"]["caption"], meta["other"]["caption"]) == ("a cover", "", "")
