import json

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from musiclm.audio import write_wav
from musiclm.constants import SEMANTIC_HOP
from musiclm.data import shards as sh
from musiclm.pipelines.prepare_audio import DEAD
from musiclm.pipelines.sample_features import (
    ReadAudioShard,
    SelectFrames,
    iter_feature_batches,
    keep_fraction,
    read_feature_manifest,
    run_sample_features,
    select_frames,
)
from musiclm.tokenizers.semantic import W2VBert, W2VBertConfig, load_w2vbert, save_w2vbert

torch.set_num_threads(1)
SR = 24000


def tone(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny w2v-BERT folder, 2 audio shards of 2-s windows (one sample corrupt), a 3-s audio file."""
    root = tmp_path_factory.mktemp("sample_features")
    torch.manual_seed(0)
    save_w2vbert(W2VBert(W2VBertConfig.preset("tiny")).eval(), root / "ckpt" / "w2vbert", "tiny")
    entries = []
    for s in range(2):
        samples = [{"__key__": f"s{s}w{i}", "json": {"source": f"clip{s}{i}.wav", "start": 0.0, "end": 2.0},
                    "wav": tone(2.0, 200 + 100 * i + 50 * s)} for i in range(3)]
        if s == 1:
            samples.append({"__key__": "s1bad", "json": {}, "flac": b"not flac at all"})
        entries.append(sh.write_shard(root / "audio" / sh.shard_name("audio", s), samples))
    sh.write_manifest(str(root / "audio"), entries, kind="audio", extra={"window_seconds": 2.0})
    write_wav(root / "files" / "long.wav", tone(3.0, 440.0), SR)
    return root


def test_select_frames_is_deterministic_and_even():
    a = select_frames(250, 0.1, 0, "key_a")
    assert np.array_equal(a, select_frames(250, 0.1, 0, "key_a"))
    assert not np.array_equal(a, select_frames(250, 0.1, 0, "key_b"))
    assert not np.array_equal(a, select_frames(250, 0.1, 1, "key_a"))
    assert len(a) == 25 and np.all(np.diff(a) > 0) and a.max() < 250
    # a fraction that is not a whole number of frames: one more frame with the fractional probability
    counts = [len(select_frames(50, 0.03, 0, f"k{i}")) for i in range(2000)]
    assert set(counts) == {1, 2} and abs(np.mean(counts) - 1.5) < 0.05
    assert keep_fraction(1000, None, 250, None) == 1.0
    assert keep_fraction(1000, 25, 250, None) == 0.1
    assert keep_fraction(1000, 25, 250, 50) == 0.05


def test_select_frames_transform():
    windows = [{"key": f"k{i}", "uri": "u", "start": 0.0, "end": 1.0, "wav": np.zeros(SEMANTIC_HOP * 10 + 5)}
               for i in range(4)]
    windows.append({"key": "short", "uri": "tiny.wav", "start": 0.0, "end": 0.01, "wav": np.zeros(100)})
    with BeamTestPipeline() as p:
        out = p | beam.Create(windows) | beam.ParDo(SelectFrames(0.3, 0)).with_outputs(DEAD, main="ok")
        assert_that(out.ok | "Frames" >> beam.Map(lambda w: (w["key"], w["frames"].tolist(), len(w["wav"]))),
                    equal_to([(f"k{i}", select_frames(10, 0.3, 0, f"k{i}").tolist(), SEMANTIC_HOP * 10)
                              for i in range(4)]), label="selected")
        assert_that(out[DEAD] | "Uri" >> beam.Map(lambda d: d["uri"]), equal_to(["tiny.wav"]), label="dead")


def test_read_audio_shard_transform(corpus, tmp_path):
    broken = tmp_path / "audio-000009.tar"
    broken.write_bytes(b"\0" * 100)
    urls = [str(corpus / "audio" / sh.shard_name("audio", s)) for s in range(2)] + [str(broken)]
    with BeamTestPipeline() as p:
        out = p | beam.Create(urls) | beam.ParDo(ReadAudioShard()).with_outputs(DEAD, main="ok")
        assert_that(out.ok | "Keys" >> beam.Map(lambda w: (w["key"], w["uri"], len(w["wav"]))),
                    equal_to([(f"s{s}w{i}", f"clip{s}{i}.wav", 2 * SR) for s in range(2) for i in range(3)]),
                    label="windows")
        assert_that(out[DEAD] | "Uri" >> beam.Map(lambda d: d["uri"]),
                    equal_to([f"{urls[1]}#s1bad", str(broken)]), label="dead")


def test_job_end_to_end_and_resume(corpus, tmp_path):
    out = tmp_path / "features"
    inputs = [str(corpus / "audio"), str(corpus / "files"), str(corpus / "files" / "missing.wav")]
    stats = run_sample_features(inputs, str(out), str(corpus / "ckpt"), frames_per_window=10, window_seconds=2.0,
                                chunk_frames=30)
    # 7 shard windows (one corrupt) and 1 file window (3 s: one full 2-s window), 50 frames each, 10 kept of each
    keys = [f"s{s}w{i}" for s in range(2) for i in range(3)] + [sh.sample_key(str(corpus / "files" / "long.wav"), 0.0)]
    assert stats["windows_in"] == 8 and stats["frames"] == 70
    assert stats["chunks"] == len({sh.shard_index(k, 3) for k in keys})  # 3 planned (80 frames expected / 30)
    assert stats["dim"] == 128 and stats["dtype"] == "float16"
    dead = sh.read_dead_letters(str(out))
    assert sorted(d["uri"].rsplit("/", 1)[-1] for d in dead) == ["audio-000001.tar#s1bad", "missing.wav"]
    manifest = read_feature_manifest(str(out))
    assert manifest["num_frames"] == 70 and manifest["num_samples"] == 7
    assert manifest["feature_model"]["backend"] == "w2vbert"

    # the rows are the model's features of the selected frames, chunk rows in window-key order
    model = load_w2vbert(corpus / "ckpt" / "w2vbert")
    chunk_of = {}
    for entry in manifest["shards"]:
        chunk_of[entry["name"]] = np.load(out / entry["name"])
    key = "s0w1"
    index = sh.shard_index(key, 3)
    in_chunk = sorted(k for k in keys if sh.shard_index(k, 3) == index)
    rows = chunk_of[f"features-{index:06d}.npy"][in_chunk.index(key) * 10 : in_chunk.index(key) * 10 + 10]
    with torch.no_grad():
        expected = model.features(torch.from_numpy(tone(2.0, 300.0))[None])[0, select_frames(50, 0.2, 0, key)]
    np.testing.assert_allclose(rows.astype(np.float32), expected.numpy(), rtol=1e-2, atol=1e-2)

    batches = list(iter_feature_batches(str(out), batch_size=32))
    assert sum(len(b) for b in batches) == 70 and max(len(b) for b in batches) <= 32

    # a rerun of the same plan writes nothing; losing one chunk redoes only its windows
    again = run_sample_features(inputs, str(out), str(corpus / "ckpt"), frames_per_window=10, window_seconds=2.0,
                                chunk_frames=30)
    assert again["metrics"].get("chunks_written", 0) == 0 and again["frames"] == 70
    lost = manifest["shards"][0]["name"]
    (out / lost).unlink()
    (out / lost.replace(".npy", ".json")).unlink()
    resumed = run_sample_features(inputs, str(out), str(corpus / "ckpt"), frames_per_window=10, window_seconds=2.0,
                                  chunk_frames=30)
    assert resumed["metrics"]["chunks_written"] == 1
    assert resumed["metrics"]["windows_in_finished_shards"] == 7 - manifest["shards"][0]["windows"]
    assert np.array_equal(np.load(out / lost), chunk_of[lost])
    assert json.loads((out / "manifest.json").read_text())["num_frames"] == 70


def test_bad_arguments_are_refused(tmp_path):
    # (max_frames spreading the sample over every window is checked through fit_component in test_fitting)
    with pytest.raises(ValueError, match="max_frames"):
        run_sample_features([str(tmp_path)], str(tmp_path / "g"), str(tmp_path), max_frames=0)
    with pytest.raises(ValueError, match="frames_per_window"):
        run_sample_features([str(tmp_path)], str(tmp_path / "g"), str(tmp_path), frames_per_window=0)
    with pytest.raises(ValueError, match="no audio"):
        run_sample_features([str(tmp_path)], str(tmp_path / "out"), str(tmp_path))
    with pytest.raises(ValueError, match="no feature sample"):
        read_feature_manifest(str(tmp_path))
