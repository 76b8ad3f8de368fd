import json
import os
import uuid
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from musiclm.audio import load_audio, write_wav
from musiclm.constants import SHARD_SCHEMA_VERSION
from musiclm.data import shards as sh
from musiclm.pipelines.options import build_pipeline_options
from musiclm.pipelines.prepare_audio import DEAD
from musiclm.pipelines.tokenize import Tokenize, default_window_seconds, run_tokenize
from musiclm.tokenizers.backends import BackendSpec, TokenRates, write_backends
from musiclm.tokenizers.bundle import TokenizerBundle, save_random_tokenizers

SR = 24000


def _clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * SR))) / SR
    return (0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tokenizers")
    save_random_tokenizers(folder, "tiny", seed=0)
    return str(folder)


@pytest.fixture(scope="module")
def bundle(ckpt) -> TokenizerBundle:
    return TokenizerBundle.load(ckpt)


def test_tokenize_dofn_isolates_a_failing_window(ckpt, bundle):
    ids = TokenizerBundle.read_ids(ckpt)
    good = [{"key": sh.sample_key("/c/a.wav", float(i)), "uri": "/c/a.wav", "start": float(i), "end": i + 1.0,
             "wav": _clip(1.0, i)} for i in range(2)]
    bad = {"key": sh.sample_key("/c/b.wav", 0.0), "uri": "/c/b.wav", "start": 0.0, "end": 0.5, "wav": _clip(0.5, 9)[:1000]}
    expected = [(w["key"], bundle.tokenize_window(w["wav"])) for w in good]
    with BeamTestPipeline(options=build_pipeline_options([])) as p:
        out = (
            p
            | beam.Create([[good[0], bad, good[1]]])  # one batch: the bad window must not fail its neighbours
            | beam.ParDo(Tokenize(ckpt, None, None, ids)).with_outputs(DEAD, main="samples")
        )
        info = bundle.token_info
        summary = out.samples | beam.Map(lambda s: (
            s["__key__"], s["json"]["source"], s["json"]["tokenizers"] == ids, s["json"]["token_info"] == info,
            s["json"]["schema"], s["acoustic"].tobytes(), s["semantic"].tobytes(), s["mulan"].tobytes()))
        assert_that(summary, equal_to([
            (key, "/c/a.wav", True, True, SHARD_SCHEMA_VERSION, t["acoustic"].tobytes(), t["semantic"].tobytes(),
             t["mulan"].tobytes())
            for key, t in expected]), label="samples")
        dead = out[DEAD] | beam.Map(lambda d: (d["uri"], d["stage"], "multiple of 960" in d["reason"]))
        assert_that(dead, equal_to([("/c/b.wav", "tokenize", True)]), label="dead")


def test_run_tokenize_dead_letters_memory_inputs_known_answer_and_reruns(ckpt, bundle, tmp_path):
    assert default_window_seconds("tiny") == 10.0 and default_window_seconds("paper") == 30.0
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_wav(str(corpus / "long.wav"), _clip(2.5, 1), SR)  # two full 1-s windows
    write_wav(str(corpus / "short.wav"), _clip(0.6, 2), SR)
    (corpus / "corrupt.flac").write_bytes(os.urandom(500))
    mem = f"memory://tok-{uuid.uuid4().hex}/one.wav"
    write_wav(mem, _clip(1.0, 3), SR)  # exactly one window
    inputs = [str(corpus), mem, str(corpus / "missing.ogg")]
    out = tmp_path / "tokens"

    stats = run_tokenize(inputs, str(out), ckpt, progress=False, window_seconds=1.0)
    assert torch.is_grad_enabled()  # the in-process runner shares this thread: no global torch state may leak
    assert (stats["files_in"], stats["files_ok"], stats["files_dead"], stats["windows"]) == (5, 2, 3, 3)
    assert stats["audio_seconds"] == 3.0 and stats["shards"] >= 1
    assert json.loads((out / "stats.json").read_text()) == stats

    dead = {Path(d["uri"]).name: d for d in sh.read_dead_letters(str(out))}
    assert sorted(dead) == ["corrupt.flac", "missing.ogg", "short.wav"]
    assert dead["short.wav"]["reason"] == "shorter than one window (0.60 s < 1.00 s)"
    assert dead["missing.ogg"]["reason"].startswith("file not found")

    manifest = sh.read_manifest(str(out))
    assert manifest["tokenizers"] == bundle.ids and manifest["schema"] == SHARD_SCHEMA_VERSION
    assert manifest["token_info"] == bundle.token_info == json.loads((out / "plan.json").read_text())["token_info"]
    assert manifest["token_info"]["rates"] == TokenRates().to_dict()
    assert manifest["window_seconds"] == 1.0 and manifest["num_samples"] == 3 and manifest["preset"] == "tiny"
    samples = {s["__key__"]: s for s in sh.iter_samples(str(out))}
    windows = sorted((Path(s["json"]["source"]).name, s["json"]["start"], s["json"]["end"]) for s in samples.values())
    assert windows == [("long.wav", 0.0, 1.0), ("long.wav", 1.0, 2.0), ("one.wav", 0.0, 1.0)]
    for s in samples.values():
        assert s["acoustic"].shape == (50, 12) and s["semantic"].shape == (25,) and s["mulan"].shape == (12,)
        assert s["acoustic"].dtype == s["semantic"].dtype == s["mulan"].dtype == np.int16
        assert s["json"]["tokenizers"] == bundle.ids and "." not in s["__key__"]
        assert s["json"]["token_info"] == bundle.token_info

    # known answer: the shard holds what the bundle gives for that crop (the job batched it with
    # other windows: float rounding may flip a near-tie between two codes, nothing more)
    one = samples[sh.sample_key("memory:///" + mem[len("memory://"):], 0.0)]
    direct = bundle.tokenize_window(load_audio(mem))
    for name in ("acoustic", "semantic", "mulan"):
        assert one[name].shape == direct[name].shape and (one[name] == direct[name]).mean() >= 0.98, name

    # rerun of the same job: no window tokenized again, no file rewritten, the same manifest
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("tokens-*.tar")}
    again = run_tokenize(inputs, str(out), ckpt, progress=False, window_seconds=1.0)
    assert again["metrics"].get("shards_written", 0) == 0 and again["metrics"].get("windows_tokenized", 0) == 0
    assert again["metrics"]["windows_in_finished_shards"] == 3 and again["files_dead"] == 3
    assert sh.read_manifest(str(out)) == manifest
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("tokens-*.tar")}
    assert after == before


def test_a_worker_with_other_tokenizers_than_the_plan_refuses_to_start(ckpt, bundle):
    planned = {**bundle.token_info, "rates": {**bundle.token_info["rates"], "acoustic_frame_rate": 75}}
    dofn = Tokenize(ckpt, None, None, bundle.ids, token_info=planned)
    with pytest.raises(RuntimeError, match="not those the job was planned with"):
        dofn.setup()
    same = Tokenize(ckpt, None, None, None, token_info=bundle.token_info)
    same.setup()
    assert same.tokenizer_ids == bundle.ids


def test_encodec_backend_shards_record_its_token_info(ckpt, tmp_path):
    """EnCodec (random weights) as the acoustic tokenizer: 75 Hz x 8 tokens, and every record says so."""
    import shutil

    from musiclm.tokenizers.pretrained import save_random_backend

    enc_ckpt = tmp_path / "ckpt"
    for name in ("w2vbert", "semantic_kmeans", "mulan", "mulan_rvq"):
        shutil.copytree(f"{ckpt}/{name}", enc_ckpt / name)
    model = save_random_backend("encodec", tmp_path / "encodec_24khz", "tiny")
    write_backends(enc_ckpt, {"acoustic": BackendSpec("acoustic", "encodec", str(model))})
    write_wav(str(tmp_path / "one.wav"), _clip(2.0, 4), SR)
    out = tmp_path / "tokens"
    stats = run_tokenize([str(tmp_path / "one.wav")], str(out), str(enc_ckpt), progress=False, window_seconds=1.0)
    assert stats["windows"] == 2 and stats["files_dead"] == 0
    manifest = sh.read_manifest(str(out))
    info = manifest["token_info"]
    assert info["acoustic"]["backend"] == "encodec" and info["rates"]["acoustic_frame_rate"] == 75
    assert info["rates"]["acoustic_codebooks"] == 8 and json.loads((out / "plan.json").read_text())["token_info"] == info
    assert manifest["tokenizers"]["encodec"] == info["acoustic"]["id"]
    samples = list(sh.iter_samples(str(out)))
    assert len(samples) == 2
    for s in samples:
        assert s["acoustic"].shape == (75, 8) and s["acoustic"].dtype == np.int16 and s["semantic"].shape == (25,)
        assert s["json"]["token_info"] == info and s["json"]["schema"] == SHARD_SCHEMA_VERSION
    assert sh.check_same_tokenizers(sh.list_shards(str(out))) == info


def test_a_melody_tokenizer_adds_melody_npy_to_every_sample(ckpt, bundle, tmp_path):
    """With melody/ + melody_rvq/ in the tokenizer folder every sample gets melody.npy (int16 [Fm, Qmel]) and
    every record names the melody tokenizer; the shards stay token shards that stage training reads."""
    import shutil

    from musiclm.tokenizers.melody import save_random_melody
    from musiclm.training import registry

    mel_ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpt, mel_ckpt)
    save_random_melody(mel_ckpt, "tiny", seed=0)
    write_wav(str(tmp_path / "one.wav"), _clip(8.5, 5), SR)
    out = tmp_path / "tokens"
    stats = run_tokenize([str(tmp_path / "one.wav")], str(out), str(mel_ckpt), progress=False,
                         window_seconds=4.0)
    assert stats["windows"] == 2 and stats["files_dead"] == 0
    manifest = sh.read_manifest(str(out))
    info = manifest["token_info"]
    assert info["melody"]["num_codebooks"] == 8 and info["melody"]["codebook_size"] == 64
    assert {k: v for k, v in info.items() if k != "melody"} == bundle.token_info
    assert set(manifest["tokenizers"]) == {*bundle.ids, "melody", "melody_rvq"}
    melody_bundle = TokenizerBundle.load(mel_ckpt)
    samples = sorted(sh.iter_samples(str(out)), key=lambda s: s["json"]["start"])
    wav = load_audio(str(tmp_path / "one.wav"))
    for s in samples:
        assert s["melody"].shape == (1, 8) and s["melody"].dtype == np.int16  # a 4-s window: one melody frame
        assert s["json"]["token_info"] == info and s["acoustic"].shape == (200, 12)
        start = int(s["json"]["start"] * SR)
        direct = melody_bundle.tokenize_window(wav[start : start + 4 * SR])["melody"]
        assert (s["melody"] == direct).mean() >= 0.9
    shards = sh.list_shards(str(out))
    assert registry.shard_kind(shards[0]) == registry.TOKENS
    assert sh.check_same_tokenizers(shards) == info
