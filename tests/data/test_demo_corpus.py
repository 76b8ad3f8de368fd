"""The procedural demo corpus: determinism, layout, captions, musical sanity, speed."""

import json
import time
import uuid

import fsspec
import numpy as np
import pytest
import soundfile as sf

from musiclm.audio import load_audio
from musiclm.data.captions import load_captions
from musiclm.data.demo_corpus import (
    GENRES,
    INSTRUMENTS,
    degree_to_midi,
    describe,
    generate_corpus,
    midi_to_hz,
    render_clip,
    sample_params,
)

SR = 24000


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_corpus(str(tmp_path / "a"), clips=3, seconds=2.0, seed=7, progress=False)
    generate_corpus(str(tmp_path / "b"), clips=3, seconds=2.0, seed=7, progress=False)
    generate_corpus(str(tmp_path / "c"), clips=3, seconds=2.0, seed=8, progress=False)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb
    assert set(fa) == set(fc)
    assert all(fa[k] != fc[k] for k in fa)
    assert [r["id"] for r in a] == ["clip_00000", "clip_00001", "clip_00002"]


def test_worker_count_does_not_change_output(tmp_path):
    generate_corpus(str(tmp_path / "one"), clips=2, seconds=1.0, seed=3, progress=False, workers=1)
    generate_corpus(str(tmp_path / "two"), clips=2, seconds=1.0, seed=3, progress=False, workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_layout_format_and_captions(tmp_path):
    records = generate_corpus(str(tmp_path), clips=4, seconds=1.5, seed=0, progress=False)
    assert len(records) == 4
    wavs = sorted((tmp_path / "audio").glob("*.wav"))
    assert [w.name for w in wavs] == [f"clip_{i:05d}.wav" for i in range(4)]
    for w in wavs:
        info = sf.info(str(w))
        assert (info.samplerate, info.channels, info.subtype, info.frames) == (SR, 1, "PCM_16", 36000)
        wav = load_audio(str(w))
        assert np.isfinite(wav).all() and 0.3 < np.abs(wav).max() <= 0.9
    lines = (tmp_path / "captions.jsonl").read_text().splitlines()
    assert len(lines) == 4
    genres = set()
    for line, record in zip(lines, records):
        row = json.loads(line)
        assert row == json.loads(json.dumps(record))
        params = row["params"]
        genres.add(params["genre"])
        caption = row["caption"]
        assert params["genre"] in caption and f"{params['bpm']} BPM" in caption
        assert params["genre"] in row["aspects"] and f"{params['bpm']} bpm" in row["aspects"]
        assert ("drums" if params["drums"] else "no drums") in row["aspects"]
        assert any(w in row["aspects"] for w in ("slow tempo", "medium tempo", "fast tempo"))
        assert f"{params['key']} {params['mode']}".lower() in row["aspects"]
    assert len(genres) == 4  # genres cycle: a small corpus is still varied
    caps = load_captions(str(tmp_path / "captions.jsonl"))
    assert set(caps) == {f"clip_{i:05d}" for i in range(4)}


def test_writes_to_fsspec_url():
    url = f"memory://demo-{uuid.uuid4().hex}/corpus"
    generate_corpus(url, clips=1, seconds=0.5, seed=1, progress=False)
    assert load_audio(f"{url}/audio/clip_00000.wav").shape == (12000,)
    with fsspec.open(f"{url}/captions.jsonl", "r") as f:
        assert json.loads(f.readline())["id"] == "clip_00000"


@pytest.mark.parametrize("genre", sorted(GENRES))
def test_every_genre_renders_music(genre):
    params = sample_params(np.random.default_rng(5), genre=genre)
    json.dumps(params)  # serialisable as written to captions.jsonl
    wav = render_clip(params, 2.0, SR)
    assert wav.shape == (2 * SR,) and wav.dtype == np.float32
    assert np.isfinite(wav).all()
    peak = np.abs(wav).max()
    assert 0.4 < peak < 0.9 if params["dynamics"] == "soft" else 0.78 < peak < 0.9  # -7 / -2 / -1 dBFS
    frames = wav[: 2 * SR].reshape(-1, 2400)  # [20, 100 ms]
    assert (np.sqrt((frames**2).mean(axis=1)) > 1e-3).mean() > 0.8  # sound throughout, not clicks
    caption, aspects = describe(params, np.random.default_rng(0))
    assert genre in caption and genre in aspects


def test_catalogue_sizes():
    assert len(GENRES) >= 6 and len(INSTRUMENTS) >= 6
    assert {"piano", "organ", "acoustic guitar", "synth pad", "flute", "distorted guitar"} <= set(INSTRUMENTS)
    assert {i.role for i in INSTRUMENTS.values()} == {"chords", "lead", "bass"}


@pytest.mark.parametrize("name", sorted(set(INSTRUMENTS) - {"distorted guitar", "808 bass"}))
def test_instrument_pitch(name):
    f0 = 110.0 if INSTRUMENTS[name].role == "bass" else 330.0
    note = INSTRUMENTS[name].render(f0, 0.8, 0.8, SR, np.random.default_rng(0))
    assert np.isfinite(note).all() and np.abs(note).max() > 0.01
    seg = note[int(0.1 * SR) : int(0.7 * SR)]  # [0.6 s] steady part
    spectrum = np.abs(np.fft.rfft(seg * np.hanning(seg.size)))
    peak_hz = np.argmax(spectrum) * SR / seg.size
    harmonic = peak_hz / f0
    assert round(harmonic) >= 1 and abs(harmonic - round(harmonic)) < 0.05 * round(harmonic), peak_hz


def test_melody_is_reusable_with_other_arrangements():
    params = sample_params(np.random.default_rng(11), genre="classical")
    melody = params["melody"]
    assert all(len(n) == 3 and n[2] > 0 for n in melody)
    assert all(0 <= n[1] < params["melody_beats"] for n in melody)
    onsets = [n[1] for n in melody]
    assert onsets == sorted(onsets)
    other = sample_params(np.random.default_rng(12), genre="techno")
    other["melody"], other["melody_beats"] = melody, params["melody_beats"]
    other["bpm"] = 90
    a, b = render_clip(params, 1.5, SR), render_clip(other, 1.5, SR)
    assert a.shape == b.shape == (36000,) and not np.allclose(a, b)


def test_scale_degrees():
    assert degree_to_midi(0, 60, "major") == 60
    assert degree_to_midi(2, 60, "minor") == 63  # minor third
    assert degree_to_midi(7, 57, "minor") == 69  # octave
    assert degree_to_midi(-1, 60, "major") == 59  # leading tone below
    assert midi_to_hz(69) == pytest.approx(440.0)


def test_speed_sanity(tmp_path):
    start = time.process_time()
    generate_corpus(str(tmp_path), clips=4, seconds=2.0, seed=2, progress=False, workers=1)
    assert time.process_time() - start < 10.0  # ~0.03 s of CPU per clip-second on this machine
