"""Continuity measures on synthetic audio: a click at a join raises the flux ratio, a metronome reads its tempo."""

import numpy as np
import pytest

from musiclm.evaluation.continuity import spectral_flux_at_joins, tempo_bpm

SR = 24000
JOINS = [2.0, 4.0, 6.0, 8.0]


def metronome(bpm: float, seconds: float = 10.0, seed: int = 0) -> np.ndarray:
    """1-kHz blips (10-ms decay) every beat over faint noise."""
    rng = np.random.default_rng(seed)
    x = 0.01 * rng.standard_normal(int(seconds * SR))
    blip = np.sin(2 * np.pi * 1000 * np.arange(2400) / SR) * np.exp(-np.arange(2400) / (0.01 * SR))
    for start in np.arange(0, seconds, 60.0 / bpm):
        s = int(start * SR)
        n = min(len(blip), len(x) - s)
        x[s : s + n] += blip[:n]
    return x


def chords(seconds: float = 10.0) -> np.ndarray:
    """Sustained, slowly swelling partials: music without onsets at the joins."""
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * f * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.3 * t + f)) for f in (220, 330, 440, 550))
    return 0.1 * x + 0.01 * np.random.default_rng(1).standard_normal(len(t))


def test_a_click_at_the_joins_raises_the_ratio():
    clean = spectral_flux_at_joins(chords(), JOINS)
    assert set(clean) == {"joins", "elsewhere", "ratio"}
    assert 0.8 < clean["ratio"] < 1.2  # the joins look like anywhere else
    clicked = chords()
    for j in JOINS:
        clicked[int(j * SR)] += 0.8  # one-sample click
    assert spectral_flux_at_joins(clicked, JOINS)["ratio"] > 2.5
    jumped = chords()
    for j in JOINS:
        jumped[int(j * SR) :] *= -1  # a phase flip: a discontinuity without a new sound
    assert spectral_flux_at_joins(jumped, JOINS)["ratio"] > 1.15 * clean["ratio"]
    # beats at the joins count as flux there too (a measure of joins, not of musical content)
    assert spectral_flux_at_joins(metronome(120), JOINS)["ratio"] > 2
    assert spectral_flux_at_joins(metronome(120), [2.25, 4.25, 6.25])["ratio"] < 1


@pytest.mark.parametrize("bpm", [60, 90, 120, 150])
def test_metronome_tempo(bpm):
    assert abs(tempo_bpm(metronome(bpm), SR) - bpm) < 0.02 * bpm


def test_tempo_survives_a_change_of_timbre_but_not_of_tempo():
    """What a story transition should keep: the tempo on each side of the boundary."""
    first, second = metronome(120, 6.0), 0.3 * np.sign(metronome(120, 6.0, seed=1))  # harsher timbre, same beat
    assert abs(tempo_bpm(first) - tempo_bpm(second)) < 2
    assert abs(tempo_bpm(metronome(100, 6.0)) - tempo_bpm(first)) > 15


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="inside the audio"):
        spectral_flux_at_joins(chords(2.0), [3.0])
    with pytest.raises(ValueError, match="no join"):
        spectral_flux_at_joins(chords(2.0), [])
    with pytest.raises(ValueError, match="mono"):
        spectral_flux_at_joins(np.zeros((2, SR)), [0.5])
    with pytest.raises(ValueError, match="non-finite"):
        tempo_bpm(np.full(SR * 4, np.nan))
    with pytest.raises(ValueError, match="too short"):
        tempo_bpm(metronome(120, 1.0))
    with pytest.raises(ValueError, match="min_bpm"):
        tempo_bpm(metronome(120), min_bpm=200, max_bpm=100)
