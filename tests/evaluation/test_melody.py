"""Melody adherence: calibrated on the melody corpus (same melody vs other melodies vs noise) and its
invariances (key, tempo, timbre) against what it must not ignore (note order)."""

import itertools

import numpy as np
import pytest

from musiclm.audio import write_wav
from musiclm.data.melody_pairs import (
    _RENDITION_TAG,
    Melody,
    _timbres,
    corpus_melody,
    render_hum,
    render_rendition,
    render_whistle,
    sample_rendition,
)
from musiclm.evaluation.melody import (
    CHANCE,
    adherence_report,
    chroma_similarity,
    frame_pitch_classes,
    melody_adherence,
    salience_chroma,
)

SR = 24000
SECONDS = 6.0


def _adherence(raw: float) -> float:
    return float(np.clip((raw - CHANCE) / (1.0 - CHANCE), 0.0, 1.0))


def _group_renditions(seed: int, melodies: int, renditions: int) -> dict[tuple[int, int], np.ndarray]:
    """The melody corpus's renditions of ``seed`` (as generate_melody_corpus renders them), in memory."""
    clips = {}
    for m in range(melodies):
        melody = corpus_melody(seed, m)
        timbres = _timbres(np.random.default_rng([seed, m, _RENDITION_TAG]), renditions)
        for k in range(renditions):
            rendition = sample_rendition(melody, np.random.default_rng([seed, m, k, _RENDITION_TAG]), timbres[k])
            clips[(m, k)] = render_rendition(melody, rendition, SECONDS, SR)
    return clips


def _noise(rng: np.random.Generator, kind: str) -> np.ndarray:
    white = rng.standard_normal(int(SECONDS * SR))
    if kind == "white":
        return 0.1 * white
    pink = np.cumsum(white)  # brown, then the slow drift removed: a pinkish, pitchless rumble-to-hiss
    pink -= np.convolve(pink, np.ones(2400) / 2400, mode="same")
    return 0.1 * pink / pink.std()


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_same_melody_scores_clearly_above_other_melodies_and_noise(seed):
    """(a) same melody, other timbre/tempo/accompaniment; (b) different melodies; (c) noise."""
    clips = _group_renditions(seed, melodies=4, renditions=3)
    chroma = {key: salience_chroma(wav, SR) for key, wav in clips.items()}
    rng = np.random.default_rng(seed)
    same, other, noise = [], [], []
    for a, b in itertools.combinations(sorted(chroma), 2):
        if a[0] == b[0]:
            same.append(_adherence(chroma_similarity(chroma[a], chroma[b])))
        elif a[1] == b[1] or (a[1] + b[1]) % 3 == 0:  # a balanced subset of the cross-melody pairs
            other.append(_adherence(chroma_similarity(chroma[a], chroma[b])))
    for key in sorted(chroma)[::2]:
        for kind in ("white", "pink"):
            noise.append(_adherence(chroma_similarity(chroma[key], salience_chroma(_noise(rng, kind), SR))))
    same, other, noise = map(np.array, (same, other, noise))
    assert same.size == 12 and other.size >= 12 and noise.size == 12
    assert same.mean() > 0.55, same
    assert other.mean() < 0.15 and noise.mean() < 0.1, (other, noise)
    assert same.mean() - max(other.mean(), noise.mean()) > 0.45
    # ranking, pair by pair: a same-melody pair beats a different-melody pair almost always
    wins = (same[:, None] > other[None, :]).mean()
    assert wins > 0.95, wins
    assert same.min() > noise.max(), (same.min(), noise.max())


def _transposed(melody: Melody, semitones: int) -> Melody:
    notes = tuple((m + semitones, on, dur) for m, on, dur in melody.notes)
    return Melody(notes, melody.beats, melody.bpm, melody.tonic_midi + semitones, melody.mode,
                  melody.progression, melody.chord_beats, melody.beats_per_bar)


def _retrograde(melody: Melody) -> Melody:
    """The same notes, durations and pitch histogram, played backwards: a different melody."""
    notes = tuple((m, melody.beats - on - dur, dur) for m, on, dur in reversed(melody.notes))
    return Melody(notes, melody.beats, melody.bpm, melody.tonic_midi, melody.mode,
                  melody.progression, melody.chord_beats, melody.beats_per_bar)


def test_invariant_to_key_tempo_and_timbre_but_not_to_note_order():
    melody = corpus_melody(21, 0)
    hum = render_hum(melody, SECONDS, SR, seed=1)
    assert melody_adherence(hum, hum, SR) > 0.97
    scores = {
        "whistle": melody_adherence(hum, render_whistle(melody, SECONDS, SR, seed=2), SR),
        "up a minor third": melody_adherence(hum, render_hum(_transposed(melody, 3), SECONDS, SR, seed=3), SR),
        "6 % slower": melody_adherence(hum, render_hum(melody, SECONDS, SR, bpm=0.94 * melody.bpm, seed=4), SR),
        "12 % faster, 'ah'": melody_adherence(
            hum, render_hum(melody, SECONDS, SR, bpm=1.12 * melody.bpm, vowel="ah", seed=5), SR),
    }
    # the hardest: an open "ah" in a low register, whose formant lifts the 3rd-5th harmonics over the fundamental
    assert min(scores.values()) > 0.5 and np.mean(list(scores.values())) > 0.75, scores
    backwards = melody_adherence(hum, render_hum(_retrograde(melody), SECONDS, SR, seed=6), SR)
    other = melody_adherence(hum, render_hum(corpus_melody(21, 1), SECONDS, SR, seed=7), SR)
    assert max(backwards, other) < min(scores.values()) - 0.3, (backwards, other, scores)


def test_frame_pitch_classes_follow_a_tune_frame_by_frame():
    t = np.arange(int(0.8 * SR)) / SR
    a4, c5 = np.sin(2 * np.pi * 440.0 * t), np.sin(2 * np.pi * 523.25 * t)  # pitch classes 9 (A) and 0 (C)
    classes, energy = frame_pitch_classes(np.concatenate([a4, c5]), 40)  # 40 frames of 40 ms = 1.6 s
    assert classes.shape == energy.shape == (40,)
    assert (classes[2:16] == 9).all() and (classes[22:36] == 0).all()  # away from the change and the end
    past_end = frame_pitch_classes(a4, 30)[1]  # 30 frames of a 0.8-s tone: frames past the end exist (zero-padded)
    assert past_end.shape == (30,) and past_end[25] == 0.0 < past_end[5]  # frame 25 (1.0 s) is silence


def test_silence_and_clicks_have_no_melody():
    hum = render_hum(corpus_melody(22, 0), SECONDS, SR)
    silence = np.zeros(int(SECONDS * SR), np.float32)
    clicks = silence.copy()
    clicks[:: SR // 2] = 0.9
    assert melody_adherence(hum, silence, SR) == 0.0
    assert melody_adherence(silence, hum, SR) == 0.0
    assert melody_adherence(hum, clicks, SR) < 0.15
    assert salience_chroma(silence, SR).shape == (0, 12)


def test_adherence_report_conditioned_beats_unconditioned_and_reads_files(tmp_path):
    seed = 23
    reference = render_hum(corpus_melody(seed, 0), SECONDS, SR, seed=1)
    clips = _group_renditions(seed, melodies=2, renditions=2)
    path = tmp_path / "hum.wav"
    write_wav(str(path), reference, SR)
    report = adherence_report(str(path), {"conditioned": clips[(0, 0)], "unconditioned": clips[(1, 0)]}, SR)
    assert report["metric"] == "melody_adherence" and set(report["scores"]) == {"conditioned", "unconditioned"}
    assert all(0.0 <= v <= 1.0 for v in report["scores"].values())
    assert report["gain"] == pytest.approx(report["scores"]["conditioned"] - report["scores"]["unconditioned"], abs=2e-4)
    assert report["gain"] > 0.3, report
    only = adherence_report(reference, {"sample_0": clips[(0, 1)]}, SR)
    assert "gain" not in only and only["scores"]["sample_0"] > 0.4


def test_bad_input_is_a_clear_value_error():
    wav = np.zeros(SR, np.float32)
    with pytest.raises(ValueError, match="at least one output"):
        adherence_report(wav, {}, SR)
    with pytest.raises(ValueError, match="NaN or Inf"):
        melody_adherence(wav, np.full(SR, np.nan), SR)
    with pytest.raises(ValueError, match="mono waveform"):
        melody_adherence(np.zeros((2, SR)), wav, SR)
    assert melody_adherence(wav[None, :], wav[:, None], SR) == 0.0  # [1, T] and [T, 1] are mono
