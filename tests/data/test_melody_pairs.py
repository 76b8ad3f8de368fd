"""Melody pairs: the corpus generator (determinism, layout, acoustics that differ within a group while
the melody's pitch classes stay), the voice-like timbres, the users' manifest and its checks."""

import json
import time

import numpy as np
import pytest
import soundfile as sf

from musiclm.audio import load_audio
from musiclm.data.captions import load_captions
from musiclm.data.melody_pairs import (
    INSTRUMENT_TIMBRES,
    TEMPO_RANGE,
    VOICE_TIMBRES,
    Melody,
    Rendition,
    as_melody,
    check_melody_groups,
    corpus_melody,
    generate_melody_corpus,
    load_melody_pairs,
    render_hum,
    render_rendition,
    render_whistle,
    write_demo_hum,
)

SR = 24000


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs_any_worker_count(tmp_path):
    generate_melody_corpus(str(tmp_path / "a"), melodies=2, renditions=2, seconds=1.5, seed=5, workers=1)
    generate_melody_corpus(str(tmp_path / "b"), melodies=2, renditions=2, seconds=1.5, seed=5, workers=2)
    generate_melody_corpus(str(tmp_path / "c"), melodies=2, renditions=2, seconds=1.5, seed=6, workers=1)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb
    assert set(fa) == set(fc) and all(fa[k] != fc[k] for k in fa if k.endswith(".wav"))


def test_layout_captions_and_groups(tmp_path):
    stats = generate_melody_corpus(str(tmp_path), melodies=3, renditions=4, seconds=2.0, seed=1)
    assert (stats["melodies"], stats["renditions"], stats["files"], stats["audio_seconds"]) == (3, 4, 12, 24.0)
    wavs = sorted((tmp_path / "audio").glob("*.wav"))
    assert [w.name for w in wavs] == [f"melody_{m:04d}_r{k:02d}.wav" for m in range(3) for k in range(4)]
    for w in wavs:
        info = sf.info(str(w))
        assert (info.samplerate, info.channels, info.subtype, info.frames) == (SR, 1, "PCM_16", 2 * SR)
        wav = load_audio(str(w))
        assert np.isfinite(wav).all() and 0.5 < np.abs(wav).max() <= 0.9
        assert (np.sqrt((wav[SR // 2 :].reshape(-1, 2400) ** 2).mean(1)) > 1e-3).mean() > 0.8  # sound throughout
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [r["melody_group"] for r in rows] == [f"melody_{m:04d}" for m in range(3) for _ in range(4)]
    assert all(r["file"] == r["audio"] and r["caption"] and r["aspects"] for r in rows)
    # the captions file keeps the group (prepare puts it into the shards) and is a valid pairs manifest
    caps = load_captions(str(tmp_path / "captions.jsonl"))
    assert caps["melody_0002_r01"]["melody_group"] == "melody_0002"
    pairs = load_melody_pairs(str(tmp_path / "captions.jsonl"))
    assert pairs[0]["audio"] == f"{tmp_path}/audio/melody_0000_r00.wav" and load_audio(pairs[0]["audio"]).size == 2 * SR
    assert check_melody_groups(pairs) == {"groups": 3, "recordings": 12, "usable_groups": 3, "short_groups": [], "ok": True}
    melodies = [json.loads(line) for line in (tmp_path / "melodies.jsonl").read_text().splitlines()]
    assert Melody.from_json({k: v for k, v in melodies[1].items() if k != "melody_group"}) == corpus_melody(1, 1)


def test_acoustics_differ_within_a_group_but_the_melody_does_not(tmp_path):
    generate_melody_corpus(str(tmp_path), melodies=4, renditions=4, seconds=1.0, seed=2, workers=1)
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    for m in range(4):
        melody = corpus_melody(2, m)
        group = [Rendition(**r["rendition"]) for r in rows if r["melody_group"] == f"melody_{m:04d}"]
        timbres = [r.timbre for r in group]
        assert len(set(timbres)) == 4 and set(timbres) & set(VOICE_TIMBRES) and set(timbres) & set(INSTRUMENT_TIMBRES)
        assert all(abs(r.bpm / melody.bpm - 1) <= TEMPO_RANGE + 1e-6 for r in group)
        assert len({r.bpm for r in group}) == 4
        assert all(isinstance(r.octave, int) for r in group)  # whole octaves only: pitch classes kept
    accompaniments = {r["rendition"]["accompaniment"] for r in rows}
    assert None in accompaniments and len(accompaniments - {None}) >= 2  # solo and several accompaniment keys
    assert any(r["rendition"]["drums"] for r in rows)


def _f0(wav: np.ndarray, lo: float, hi: float) -> float:
    """Autocorrelation pitch of a steady excerpt (strongest period between 1/hi and 1/lo)."""
    seg = wav[int(0.2 * SR) : int(0.6 * SR)].astype(np.float64)
    ac = np.fft.irfft(np.abs(np.fft.rfft(seg, 2 * seg.size)) ** 2)[: seg.size]
    lags = np.arange(int(SR / hi), int(SR / lo))
    return SR / lags[np.argmax(ac[lags])]


def _one_note(midi: int) -> Melody:
    return Melody(((midi, 0.0, 4.0),), 4.0, 60.0, midi, "major", (0,), 4, 4)


def test_hum_and_whistle_play_the_pitch_with_their_own_timbres():
    note = _one_note(57)  # A3, 220 Hz
    hum = render_hum(note, 1.0, SR, octave=0, offset=0.0)
    whistle = render_whistle(note, 1.0, SR, octave=2, offset=0.0)  # two octaves up: 880 Hz
    assert _f0(hum, 100, 400) == pytest.approx(220.0, rel=0.03)
    assert _f0(whistle, 500, 1500) == pytest.approx(880.0, rel=0.03)

    def fundamental_share(wav, f0):
        spec = np.abs(np.fft.rfft(wav[int(0.2 * SR) : int(0.8 * SR)] * np.hanning(int(0.6 * SR)))) ** 2
        freqs = np.fft.rfftfreq(int(0.6 * SR), 1 / SR)
        return spec[np.abs(freqs - f0) < 15].sum() / spec.sum()

    assert fundamental_share(whistle, 880.0) > 0.8  # a near-sine
    # a voice: the vowel's formants, not the pitch, decide which harmonics carry the energy
    assert fundamental_share(hum, 220.0) > 0.9  # "mm" near its 260-Hz nasal formant: almost a sine, like a hum
    assert fundamental_share(render_hum(note, 1.0, SR, octave=-1, offset=0.0), 110.0) < 0.4  # same "mm" an octave down
    assert fundamental_share(render_hum(note, 1.0, SR, octave=0, vowel="ah", offset=0.0), 220.0) < 0.1  # F1 at 730 Hz
    frames = hum[: SR].reshape(-1, 480)
    pitch_track = [_f0(np.tile(f, 40), 150, 300) for f in frames[10:40:6]]
    assert np.ptp(pitch_track) > 1.0  # vibrato moves the pitch


def test_rendition_is_deterministic_and_renders_each_timbre():
    melody = corpus_melody(3, 0)
    base = dict(bpm=melody.bpm, octave=0, accompaniment="dominant", chord_instrument="piano",
                bass_instrument="bass guitar", comping="arpeggio", drums=True, reverb=0.2, offset=0.1, vowel="oo", seed=7)
    for timbre in ("flute", "hum", "whistle"):
        r = Rendition(timbre=timbre, **base)
        a, b = render_rendition(melody, r, 1.0, SR), render_rendition(melody, r, 1.0, SR)
        assert a.shape == (SR,) and np.array_equal(a, b) and np.isfinite(a).all()


def test_write_demo_hum_is_the_corpus_melody(tmp_path):
    info = write_demo_hum(str(tmp_path / "hum.wav"), seed=4, seconds=3.0)
    wav = load_audio(str(tmp_path / "hum.wav"))
    assert wav.shape == (3 * SR,) and info["melody_group"] == "melody_0000"
    assert Melody.from_json(info["melody"]) == corpus_melody(4, 0)
    with pytest.raises(ValueError, match="seconds"):
        write_demo_hum(str(tmp_path / "x.wav"), seconds=0)


def _manifest(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_users_pairs_manifest(tmp_path):
    path = _manifest(tmp_path, [
        {"audio": "covers/song_a_live.flac", "melody_group": "song a", "caption": "a live cover"},
        {"audio": "gs://bucket/song_a_studio.wav", "melody_group": "song a"},
        {"audio": "/data/song_b_vocals.wav", "melody_group": " song b "},
        "",
        {"audio": "song_b_piano.mp3", "melody_group": "song b", "caption": None},
        {"audio": "song_c.wav", "melody_group": "song c"},
    ])
    rows = load_melody_pairs(path)
    assert [r["audio"] for r in rows] == [f"{tmp_path}/covers/song_a_live.flac", "gs://bucket/song_a_studio.wav",
                                          "/data/song_b_vocals.wav", f"{tmp_path}/song_b_piano.mp3", f"{tmp_path}/song_c.wav"]
    assert [r["melody_group"] for r in rows] == ["song a", "song a", "song b", "song b", "song c"]
    assert rows[0]["caption"] == "a live cover" and rows[1]["caption"] == rows[3]["caption"] == ""
    report = check_melody_groups(rows)
    assert report == {"groups": 3, "recordings": 5, "usable_groups": 2, "short_groups": ["song c"], "ok": False}
    with pytest.raises(ValueError, match="1 melody group.*fewer than 2 recordings: song c"):
        check_melody_groups(rows, strict=True)
    with pytest.raises(ValueError, match="only 1 group"):
        check_melody_groups(rows[:2], strict=True)
    # the manifest doubles as the captions file of `prepare`: groups reach the shards by file stem
    caps = load_captions(path)
    assert caps["song_b_vocals"]["melody_group"] == "song b" and caps["song_c"]["caption"] == ""


@pytest.mark.parametrize("row, message", [
    ({"melody_group": "x"}, r"pairs.jsonl:2: row has no 'audio'"),
    ({"audio": "  ", "melody_group": "x"}, r":2: row has no 'audio'"),
    ({"audio": "b.wav", "melody_group": ""}, r":2: row has an empty or missing 'melody_group'"),
    ({"audio": "b.wav", "melody_group": "   "}, r":2: .*'melody_group'"),
    ({"audio": "b.wav"}, r":2: .*'melody_group'"),
    ({"audio": "b.wav", "melody_group": ["x"]}, r":2: .*'melody_group'"),
    ('{"audio": "b.wav", ', r":2: not a JSON line"),
    ('["b.wav", "x"]', r":2: a row must be a JSON object"),
    ({"audio": "other/a.flac", "melody_group": "x"}, r":2: .*same file stem 'a' as line 1"),
])
def test_bad_manifest_rows_name_the_line(tmp_path, row, message):
    path = _manifest(tmp_path, [{"audio": "a.wav", "melody_group": "x"}, row])
    with pytest.raises(ValueError, match=message):
        load_melody_pairs(path)


def test_empty_manifest_and_bad_corpus_arguments(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        load_melody_pairs(_manifest(tmp_path, [""]))
    with pytest.raises(ValueError, match="renditions >= 2"):
        generate_melody_corpus(str(tmp_path / "x"), melodies=2, renditions=1)
    with pytest.raises(ValueError, match="seconds must be positive"):
        generate_melody_corpus(str(tmp_path / "x"), melodies=2, renditions=2, seconds=0)
    with pytest.raises(ValueError, match="unknown vowel"):
        render_hum(corpus_melody(0, 0), 1.0, vowel="ee")
    with pytest.raises(ValueError, match="seconds must be positive"):
        render_whistle(corpus_melody(0, 0), 0.0)
    with pytest.raises(ValueError, match="a melody needs notes"):
        render_hum([(60, 0.0, 0.0)], 1.0)


def test_a_plain_note_list_is_a_melody():
    notes = [(60, 0.0, 1.0), (64, 1.0, 1.0), (67, 2.0, 2.0)]
    melody = as_melody(notes, bpm=120.0)
    assert (melody.beats, melody.bpm, melody.notes[1]) == (4.0, 120.0, (64, 1.0, 1.0))
    assert np.array_equal(render_hum(notes, 1.0, SR, bpm=120.0), render_hum(melody, 1.0, SR))


def test_speed_sanity(tmp_path):
    start = time.process_time()
    generate_melody_corpus(str(tmp_path), melodies=4, renditions=2, seconds=5.0, seed=3, workers=1)
    assert time.process_time() - start < 4.0  # 40 clip-seconds; ~0.01 s of CPU per clip-second measured
