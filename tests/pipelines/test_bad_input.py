"""A corpus of awkward and broken files through the real tokenization job.

Every file must end in a shard or in ``dead_letter.jsonl`` with its reason; what can be read is
tokenized whatever its layout (mono, stereo, 6 channels) and rate (8 to 96 kHz), and silence,
clipping and a DC offset are music to tokenize, not errors: silence is music's rest, clipping is
how much music is mastered, and a DC offset (a window mean beyond -40 dBFS) is removed per window
by the reader (see ``musiclm.audio.AudioStream.windows``). A window with NaN/Inf samples is dead-lettered on its own
and the rest of its file still tokenizes.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from musiclm.audio import encode_flac, encode_wav
from musiclm.data import shards as sh
from musiclm.pipelines.tokenize import run_tokenize
from musiclm.tokenizers.bundle import save_random_tokenizers

SR = 24000


def _tone(seconds: float, rate: int = SR, freq: float = 330.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tokenizers")
    save_random_tokenizers(folder, "tiny", seed=0)
    return str(folder)


@pytest.fixture(scope="module")
def job(ckpt, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad-corpus")
    c = root / "corpus"
    c.mkdir()
    # readable, in every layout and rate: tokenized
    sf.write(c / "mono24k.wav", _tone(2.0), SR, subtype="PCM_16")  # two 1-s windows
    sf.write(c / "stereo44k.flac", np.stack([_tone(1.5, 44100), _tone(1.5, 44100, 550)], 1), 44100, subtype="PCM_16")
    sf.write(c / "six48k.wav", np.stack([_tone(1.2, 48000, 110 * (i + 1)) for i in range(6)], 1), 48000, subtype="PCM_16")
    sf.write(c / "low8k.wav", _tone(1.0, 8000), 8000, subtype="PCM_16")
    sf.write(c / "high96k.flac", _tone(1.0, 96000), 96000, subtype="PCM_24")
    sf.write(c / "silence.wav", np.zeros(SR, np.float32), SR, subtype="PCM_16")
    sf.write(c / "clipped.wav", np.clip(10 * _tone(1.0), -1, 1), SR, subtype="PCM_16")  # a full-scale square wave
    music = 0.1 * np.sin(2 * np.pi * 330 * np.arange(SR) / SR)
    sf.write(c / "dc.wav", (0.8 + music).astype(np.float32), SR, subtype="FLOAT")  # a huge DC offset ...
    sf.write(c / "dc_twin.wav", music.astype(np.float32), SR, subtype="FLOAT")  # ... and the same music without it
    nan_mid = _tone(3.0)
    nan_mid[int(1.5 * SR)] = np.nan  # spoils the window [1 s, 2 s) only
    sf.write(c / "nan_mid.wav", nan_mid, SR, subtype="FLOAT")
    flac = encode_flac(_tone(12.0), SR)
    # an interrupted copy: breaks off after ~7 s; the reader's 5-s blocks before the break are kept
    (c / "cut.flac").write_bytes(flac[: int(len(flac) * 0.6)])
    # unusable as a whole: dead-lettered
    sf.write(c / "inf.wav", np.full(int(1.5 * SR), np.inf, np.float32), SR, subtype="FLOAT")
    (c / "empty.wav").write_bytes(b"")
    wav = encode_wav(_tone(2.0), SR)
    (c / "truncated.wav").write_bytes(wav[: len(wav) // 2])
    (c / "corrupt.flac").write_bytes(os.urandom(3000))
    (c / "short.wav").write_bytes(encode_wav(_tone(0.4), SR))
    (root / "notes.txt").write_text("not audio at all\n")
    inputs = [str(c), str(root / "notes.txt"), str(root / "missing.ogg")]
    out = root / "tokens"
    stats = run_tokenize(inputs, str(out), ckpt, progress=False, window_seconds=1.0)
    samples = list(sh.iter_samples(str(out)))
    return {"stats": stats, "samples": samples, "dead": sh.read_dead_letters(str(out)), "corpus": c, "root": root}


def _by_file(samples: list[dict]) -> dict[str, dict[float, dict]]:
    files: dict[str, dict[float, dict]] = {}
    for s in samples:
        files.setdefault(Path(s["json"]["source"]).name, {})[s["json"]["start"]] = s
    return files


def test_every_file_ends_in_a_shard_or_a_dead_letter_with_its_reason(job):
    dead = {(Path(d["uri"]).name, d["stage"], d.get("start")): d["reason"] for d in job["dead"]}
    cut = [key for key in dead if key[0] == "cut.flac"]
    assert len(cut) == 1 and cut[0][1] == "read" and cut[0][2] >= 1.0
    cut_reason = dead.pop(cut[0])
    assert cut_reason.startswith("truncated or corrupt audio") and cut_reason.endswith(
        f"windows from {cut[0][2]:.2f} s on are lost")
    root = job["root"]
    assert dead == {
        ("inf.wav", "read", None): "audio contains non-finite samples (NaN or Inf) in every window",
        ("empty.wav", "read", None): "empty file (0 bytes)",
        ("truncated.wav", "read", None):
            "truncated WAV: the header declares 96000 bytes of samples, the file holds 47978",
        ("corrupt.flac", "read", None): "not an audio file libsndfile can read (Format not recognised)",
        ("short.wav", "read", None): "shorter than one window (0.40 s < 1.00 s)",
        ("notes.txt", "read", None): "not an audio file libsndfile can read (Format not recognised)",
        ("missing.ogg", "read", None): f"file not found: {root / 'missing.ogg'}",
        ("nan_mid.wav", "window", 1.0): "non-finite samples (NaN or Inf) in the window at 1.00 s",
    }
    files = _by_file(job["samples"])
    assert {name: sorted(starts) for name, starts in files.items()} == {
        "mono24k.wav": [0.0, 1.0], "stereo44k.flac": [0.0], "six48k.wav": [0.0], "low8k.wav": [0.0],
        "high96k.flac": [0.0], "silence.wav": [0.0], "clipped.wav": [0.0], "dc.wav": [0.0], "dc_twin.wav": [0.0],
        "nan_mid.wav": [0.0, 2.0],  # the window around the NaN is gone, its neighbours are not
        "cut.flac": [float(s) for s in range(int(cut[0][2]))],  # the windows before the break
    }
    # whole-file letters and shards never share a file; the job's counts agree
    whole_dead = {name for name, stage, start in dead if stage == "read" and start is None}
    assert not whole_dead & set(files)
    stats = job["stats"]
    assert (stats["files_in"], stats["files_dead"], stats["files_ok"]) == (18, 7, 11)
    assert stats["windows"] == len(job["samples"]) == 12 + int(cut[0][2])
    assert stats["dead_letters"] == 9 and stats["metrics"]["windows_non_finite"] == 2  # nan_mid's and inf's one each


def test_what_can_be_read_tokenizes_in_range(job):
    for s in job["samples"]:
        assert s["acoustic"].shape == (50, 12) and s["semantic"].shape == (25,) and s["mulan"].shape == (12,), s["__key__"]
        for name in ("acoustic", "semantic", "mulan"):
            assert s[name].dtype == np.int16 and 0 <= s[name].min() and s[name].max() < 1024


def test_dc_offset_is_removed_before_tokenizing(job):
    files = _by_file(job["samples"])
    dc, twin = files["dc.wav"][0.0], files["dc_twin.wav"][0.0]
    for name in ("acoustic", "semantic", "mulan"):  # float rounding of the offset may flip a near-tie, no more
        assert (dc[name] == twin[name]).mean() >= 0.98, name
    assert not np.array_equal(files["silence.wav"][0.0]["acoustic"], twin["acoustic"])  # tokens do tell audio apart
