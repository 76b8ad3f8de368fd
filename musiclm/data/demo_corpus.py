"""A deterministic, procedurally generated music corpus with MusicCaps-style captions.

The demo must run offline, so instead of downloading MusicCaps we *compose* music: a genre template
(tempo range, drum pattern, chord progression style, comping and bass styles, instruments, swing,
dynamics) is sampled into a parameter dict, a melody, chords and a bass line are written from the
key/mode and the progression, and every note is synthesised in numpy (wavetable additive synthesis,
FM, Karplus-Strong plucks, noise drums). The parameters also produce the caption and the aspect list,
so MuLan has real text–audio structure to learn (genre, instruments, tempo, mood, key, dynamics,
drums or not).

The melody is a parameter of its own — a list of ``(scale degree, onset beat, duration beats)`` — that
:func:`render_clip` can play with any instrument, tempo, key and mode: melody conditioning reuses it
("same melody, other arrangement").

Everything is a pure function of ``(seed, clip index)``: the same seed gives byte-identical files,
whatever the number of worker processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context

import fsspec
import numpy as np

from musiclm.audio.io import encode_wav
from musiclm.constants import SAMPLE_RATE

__all__ = [
    "GENRES",
    "INSTRUMENTS",
    "KEYS",
    "SCALES",
    "Genre",
    "Instrument",
    "describe",
    "generate_corpus",
    "render_clip",
    "sample_params",
]

# --------------------------------------------------------------------------------------------
# Music theory
# --------------------------------------------------------------------------------------------

SCALES: dict[str, tuple[int, ...]] = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
KEYS = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


def degree_to_midi(degree: int, tonic_midi: int, mode: str) -> int:
    """MIDI pitch of a (possibly negative or > 6) scale degree; 0 is the tonic."""
    octave, step = divmod(int(degree), 7)
    return tonic_midi + 12 * octave + SCALES[mode][step]


def midi_to_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


# --------------------------------------------------------------------------------------------
# Oscillators and instruments
# --------------------------------------------------------------------------------------------

_TABLE = 4096  # samples per wavetable cycle
_SINE = np.sin(2 * np.pi * np.arange(_TABLE) / _TABLE).astype(np.float32)


@lru_cache(maxsize=512)
def _wavetable(amps: tuple[float, ...]) -> np.ndarray:
    """One cycle of a harmonic spectrum ``sum_k amps[k] sin(2 pi (k+1) x)``, peak-normalised."""
    k = np.arange(1, len(amps) + 1)[:, None]  # [K, 1]
    x = np.arange(_TABLE)[None, :] / _TABLE  # [1, TABLE]
    cycle = (np.asarray(amps)[:, None] * np.sin(2 * np.pi * k * x)).sum(0)  # [TABLE]
    return (cycle / np.abs(cycle).max()).astype(np.float32)


def _band_limited(amps: Callable[[int], float], f0: float, sr: int, max_harmonics: int) -> tuple[float, ...]:
    """Harmonic amplitudes up to ``max_harmonics`` and below 0.45 sr (no aliasing)."""
    count = max(1, min(max_harmonics, int(0.45 * sr / f0)))
    return tuple(round(float(amps(k)), 6) for k in range(1, count + 1))


def _lookup(table: np.ndarray, cycles: np.ndarray) -> np.ndarray:
    """Read a wavetable at phases given in cycles (nearest sample of a 4096-point table)."""
    idx = (cycles * _TABLE).astype(np.int64) & (_TABLE - 1)
    return table[idx]


@lru_cache(maxsize=4)
def _clock(sr: int) -> np.ndarray:
    """Sample times ``arange(60 s) / sr`` computed once; notes slice it instead of rebuilding it."""
    t = np.arange(60 * sr) / sr
    t.setflags(write=False)
    return t


def _time(n: int, sr: int) -> np.ndarray:
    return _clock(sr)[:n] if n <= 60 * sr else np.arange(n) / sr


def _phase(f0: float, n: int, sr: int, vibrato_hz: float = 0.0, depth: float = 0.0, detune: float = 0.0) -> np.ndarray:
    """Oscillator phase in cycles for ``n`` samples, with optional vibrato (relative ``depth``)."""
    t = _time(n, sr)
    phase = f0 * (1.0 + detune) * t
    if depth > 0.0:
        # integral of f0 * depth * sin(2 pi v t)
        phase += f0 * depth * (1.0 - np.cos(2 * np.pi * vibrato_hz * t)) / (2 * np.pi * vibrato_hz)
    return phase


def _adsr(n: int, gate: int, sr: int, attack: float, decay: float, sustain: float, release: float) -> np.ndarray:
    """Piecewise-linear ADSR envelope of ``n`` samples whose key is released at sample ``gate``."""
    a, d, r = max(1, int(attack * sr)), max(1, int(decay * sr)), max(1, int(release * sr))
    times = [0, a, a + d]
    values = [0.0, 1.0, sustain]
    idx = np.arange(n)
    env = np.interp(idx, times, values)
    held = np.interp(min(gate, n - 1), times, values)
    tail = idx >= gate
    env[tail] = held * np.clip(1.0 - (idx[tail] - gate) / r, 0.0, 1.0)
    return env.astype(np.float32)


@lru_cache(maxsize=64)
def _lowpass_taps(cutoff: float, sr: int, taps: int = 63) -> np.ndarray:
    """Blackman-windowed sinc lowpass FIR (numpy only: workers skip scipy.signal's slow import)."""
    m = np.arange(taps) - (taps - 1) / 2
    h = np.sinc(2 * cutoff / sr * m) * np.blackman(taps)
    return h / h.sum()


def _lowpass(x: np.ndarray, cutoff: float, sr: int) -> np.ndarray:
    """Zero-phase FIR lowpass (same length as ``x``)."""
    cutoff = min(float(cutoff), 0.45 * sr)
    taps = _lowpass_taps(round(cutoff, 1), sr)
    delay = (taps.size - 1) // 2
    return np.convolve(x, taps)[delay : delay + x.size].astype(np.float32)  # "same", for any length


def _fast_fft_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: sizes that numpy's FFT handles fast."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35 * (1 << max(0, (-(-n // p35) - 1).bit_length()))
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def _convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Full linear convolution by FFT (the reverb)."""
    size = _fast_fft_len(x.size + h.size - 1)
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[: x.size + h.size - 1]


def _karplus_strong(f0: float, n: int, sr: int, damping: float, brightness: float) -> np.ndarray:
    """Plucked string: a noise burst circulating in a delay line with an averaging lowpass.

    Plucks of one pitch are cached (like a sampler's recordings): the burst is seeded by the period,
    so the result is a pure function of its arguments whichever process renders it.
    """
    period = max(2, int(round(sr / f0 - 0.5)))  # the averaging filter adds half a sample of delay
    quarter = sr // 4
    length = -(-n // quarter) * quarter  # round up to a quarter second so that notes share the cache
    return _pluck(period, length, sr, round(damping, 4), round(brightness, 1))[:n]


@lru_cache(maxsize=128)
def _pluck(period: int, n: int, sr: int, damping: float, brightness: float) -> np.ndarray:
    """Karplus-Strong computed one period (block of ``period`` samples) at a time: ``n / period`` steps."""
    rng = np.random.default_rng([period, sr])
    burst = rng.uniform(-1.0, 1.0, period)
    burst = _lowpass(burst, 500.0 + 7000.0 * brightness, sr).astype(np.float64)
    burst -= burst.mean()
    blocks = [burst]
    last_of_block_before = 0.0
    for _ in range(n // period):
        prev = blocks[-1]
        shifted = np.concatenate(([last_of_block_before], prev[:-1]))  # y[n - P - 1]
        last_of_block_before = prev[-1]
        blocks.append(damping * 0.5 * (prev + shifted))
    out = np.concatenate(blocks)[:n].astype(np.float32)
    out.setflags(write=False)  # shared by every note of this pitch
    return out


@dataclass(frozen=True)
class Instrument:
    """A timbre: ``render(f0, duration_s, velocity, sr, rng) -> samples`` (duration plus release)."""

    name: str
    role: str  # "chords", "lead" or "bass" (where the arranger may use it)
    octave: int  # MIDI octave offset of its register relative to the clip's middle register
    release: float  # seconds of sound after the note-off
    render: Callable[[float, float, float, int, np.random.Generator], np.ndarray]
    words: str  # how captions name it


def _piano(f0, dur, vel, sr, rng):
    n = int((dur + 0.12) * sr)
    bright = _wavetable(_band_limited(lambda k: k ** -1.1 * (1.0 + 0.5 * (k == 2)), f0, sr, 12))
    dull = _wavetable(_band_limited(lambda k: 3.0 ** -(k - 1), f0, sr, 4))
    phase = _phase(f0, n, sr, detune=0.0)
    t = _time(n, sr)
    mix = np.exp(-t * (4.0 - 2.0 * vel))  # brightness fades as the hammer's energy decays
    tone = mix * _lookup(bright, phase) + (1 - mix) * _lookup(dull, phase)
    tone += 0.5 * _lookup(dull, phase * 1.0013)  # second string, slightly detuned: beating
    sustain = np.exp(-t / (0.6 + 1.2 * (220.0 / f0) ** 0.5))
    env = sustain * _adsr(n, int(dur * sr), sr, 0.003, 0.05, 1.0, 0.1)
    return (0.6 * vel * env * tone).astype(np.float32)


def _electric_piano(f0, dur, vel, sr, rng):
    n = int((dur + 0.2) * sr)
    t = _time(n, sr)
    index = (0.5 + 2.0 * vel) * np.exp(-t / 0.25)  # FM index decays: bell-like attack, mellow tail
    modulator = _lookup(_SINE, f0 * t)
    tone = _lookup(_SINE, f0 * t + index * modulator / (2 * np.pi) * 2.0)
    tone += 0.15 * np.exp(-t / 0.08) * _lookup(_SINE, 14.0 * f0 * t)  # tine "ping"
    env = np.exp(-t / 1.5) * _adsr(n, int(dur * sr), sr, 0.002, 0.05, 1.0, 0.18)
    tremolo = 1.0 + 0.1 * _lookup(_SINE, 4.5 * t)
    return (0.55 * vel * env * tremolo * tone).astype(np.float32)


def _organ(f0, dur, vel, sr, rng):
    n = int((dur + 0.06) * sr)
    drawbars = {1: 1.0, 2: 0.8, 3: 0.6, 4: 0.5, 6: 0.3, 8: 0.25}
    table = _wavetable(_band_limited(lambda k: drawbars.get(k, 0.0), f0, sr, 8))
    t = _time(n, sr)
    leslie = 1.0 + 0.15 * _lookup(_SINE, 6.2 * t)
    env = _adsr(n, int(dur * sr), sr, 0.01, 0.01, 1.0, 0.05)
    return (0.35 * vel * env * leslie * _lookup(table, _phase(f0, n, sr, 6.2, 0.002))).astype(np.float32)


def _acoustic_guitar(f0, dur, vel, sr, rng):
    n = int((dur + 0.25) * sr)
    pluck = _karplus_strong(f0, n, sr, damping=0.996, brightness=0.3 + 0.5 * vel)
    env = _adsr(n, int(dur * sr), sr, 0.001, 0.01, 1.0, 0.25)
    return (0.7 * vel * env * pluck).astype(np.float32)


def _distorted_guitar(f0, dur, vel, sr, rng):
    """A power chord (root, fifth, octave) through a tanh overdrive and a cabinet-like lowpass."""
    n = int((dur + 0.08) * sr)
    strings = sum(
        _karplus_strong(f0 * ratio, n, sr, damping=0.999, brightness=0.9) for ratio in (1.0, 1.4983, 2.0)
    )
    driven = np.tanh(6.0 * strings) / np.tanh(6.0)
    cab = _lowpass(_lowpass(driven, 3500.0, sr), 5000.0, sr)
    env = _adsr(n, int(dur * sr), sr, 0.002, 0.01, 1.0, 0.06)
    return (0.35 * vel * env * cab).astype(np.float32)


def _saw(k: int, rolloff: float) -> float:
    return (1.0 / k) * np.exp(-k / rolloff)


def _synth_pad(f0, dur, vel, sr, rng):
    n = int((dur + 0.6) * sr)
    table = _wavetable(_band_limited(lambda k: _saw(k, 5.0), f0, sr, 16))
    tone = sum(_lookup(table, _phase(f0, n, sr, detune=d)) for d in (-0.006, 0.0, 0.0065))
    t = _time(n, sr)
    env = _adsr(n, int(dur * sr), sr, 0.35, 0.3, 0.8, 0.6) * (1.0 + 0.08 * _lookup(_SINE, 0.7 * t))
    return (0.22 * vel * env * tone).astype(np.float32)


def _strings(f0, dur, vel, sr, rng):
    n = int((dur + 0.3) * sr)
    table = _wavetable(_band_limited(lambda k: _saw(k, 9.0), f0, sr, 20))
    tone = _lookup(table, _phase(f0, n, sr, 5.5, 0.004)) + _lookup(table, _phase(f0, n, sr, 4.9, 0.004, 0.004))
    env = _adsr(n, int(dur * sr), sr, 0.18, 0.2, 0.85, 0.3)
    return (0.3 * vel * env * tone).astype(np.float32)


def _flute(f0, dur, vel, sr, rng):
    n = int((dur + 0.08) * sr)
    table = _wavetable(_band_limited(lambda k: {1: 1.0, 2: 0.3, 3: 0.12, 4: 0.05}.get(k, 0.0), f0, sr, 4))
    tone = _lookup(table, _phase(f0, n, sr, 5.0, 0.006))
    breath = _lowpass(rng.standard_normal(n), 4000.0, sr) * 0.06
    env = _adsr(n, int(dur * sr), sr, 0.06, 0.1, 0.85, 0.08)
    return (0.5 * vel * env * (tone + breath)).astype(np.float32)


def _synth_lead(f0, dur, vel, sr, rng):
    n = int((dur + 0.05) * sr)
    table = _wavetable(_band_limited(lambda k: (k % 2) / k * np.exp(-k / 12.0), f0, sr, 24))  # square-ish
    tone = _lookup(table, _phase(f0, n, sr, 5.5, 0.003)) + 0.5 * _lookup(table, _phase(f0, n, sr, detune=0.01))
    env = _adsr(n, int(dur * sr), sr, 0.005, 0.1, 0.7, 0.05)
    return (0.3 * vel * env * tone).astype(np.float32)


def _trumpet(f0, dur, vel, sr, rng):
    n = int((dur + 0.06) * sr)
    bright = _wavetable(_band_limited(lambda k: k ** -0.8, f0, sr, 14))
    dull = _wavetable(_band_limited(lambda k: k ** -2.0, f0, sr, 6))
    phase = _phase(f0, n, sr, 5.2, 0.003)
    env = _adsr(n, int(dur * sr), sr, 0.03, 0.12, 0.75, 0.06)
    mix = np.clip(env * vel, 0.0, 1.0)  # brass gets brighter as it gets louder
    return (0.4 * vel * env * (mix * _lookup(bright, phase) + (1 - mix) * _lookup(dull, phase))).astype(np.float32)


def _vibraphone(f0, dur, vel, sr, rng):
    n = int((dur + 0.8) * sr)
    t = _time(n, sr)
    tone = _lookup(_SINE, f0 * t) + 0.25 * np.exp(-t / 0.3) * _lookup(_SINE, 3.98 * f0 * t)
    tone += 0.08 * np.exp(-t / 0.08) * _lookup(_SINE, 9.8 * f0 * t)
    env = np.exp(-t / 1.8) * _adsr(n, int(dur * sr), sr, 0.002, 0.01, 1.0, 0.8)
    return (0.5 * vel * env * (1.0 + 0.25 * _lookup(_SINE, 5.0 * t)) * tone).astype(np.float32)


def _bass_guitar(f0, dur, vel, sr, rng):
    n = int((dur + 0.08) * sr)
    bright = _wavetable(_band_limited(lambda k: k ** -1.3, f0, sr, 10))
    dull = _wavetable(_band_limited(lambda k: 4.0 ** -(k - 1), f0, sr, 3))
    t = _time(n, sr)
    phase = _phase(f0, n, sr)
    mix = np.exp(-t / 0.15)
    env = np.exp(-t / 1.2) * _adsr(n, int(dur * sr), sr, 0.004, 0.05, 0.9, 0.06)
    return (0.7 * vel * env * (mix * _lookup(bright, phase) + (1 - mix) * _lookup(dull, phase))).astype(np.float32)


def _upright_bass(f0, dur, vel, sr, rng):
    n = int((dur + 0.15) * sr)
    pluck = _karplus_strong(f0, n, sr, damping=0.993, brightness=0.15)
    body = _lookup(_SINE, _phase(f0, n, sr)) * np.exp(-np.arange(n) / sr / 0.6)
    env = _adsr(n, int(dur * sr), sr, 0.003, 0.02, 1.0, 0.15)
    return (vel * env * (0.6 * pluck + 0.5 * body)).astype(np.float32)


def _synth_bass(f0, dur, vel, sr, rng):
    n = int((dur + 0.05) * sr)
    bright = _wavetable(_band_limited(lambda k: 1.0 / k, f0, sr, 24))
    dull = _wavetable(_band_limited(lambda k: 5.0 ** -(k - 1), f0, sr, 3))
    t = _time(n, sr)
    phase = _phase(f0, n, sr)
    sweep = np.exp(-t / 0.09)  # filter envelope: a bright "pluck" closing to a round tone
    tone = sweep * _lookup(bright, phase) + (1 - sweep) * _lookup(dull, phase)
    env = _adsr(n, int(dur * sr), sr, 0.003, 0.1, 0.8, 0.05)
    return (0.6 * vel * env * tone).astype(np.float32)


def _bass_808(f0, dur, vel, sr, rng):
    n = int((dur + 0.2) * sr)
    t = _time(n, sr)
    freq = f0 * (1.0 + 1.0 * np.exp(-t / 0.02))  # pitch drop on the attack
    phase = np.cumsum(freq) / sr
    tone = np.tanh(2.0 * _lookup(_SINE, phase)) / np.tanh(2.0)
    env = np.exp(-t / 1.0) * _adsr(n, int(dur * sr), sr, 0.002, 0.01, 1.0, 0.2)
    return (0.8 * vel * env * tone).astype(np.float32)


INSTRUMENTS: dict[str, Instrument] = {
    inst.name: inst
    for inst in [
        Instrument("piano", "chords", 0, 0.12, _piano, "piano"),
        Instrument("electric piano", "chords", 0, 0.2, _electric_piano, "electric piano"),
        Instrument("organ", "chords", 0, 0.06, _organ, "organ"),
        Instrument("acoustic guitar", "chords", 0, 0.25, _acoustic_guitar, "acoustic guitar"),
        Instrument("distorted guitar", "chords", -1, 0.08, _distorted_guitar, "distorted electric guitar"),
        Instrument("synth pad", "chords", 0, 0.6, _synth_pad, "warm synth pad"),
        Instrument("strings", "chords", 0, 0.3, _strings, "string section"),
        Instrument("flute", "lead", 0, 0.08, _flute, "flute"),
        Instrument("synth lead", "lead", 0, 0.05, _synth_lead, "synth lead"),
        Instrument("trumpet", "lead", 0, 0.06, _trumpet, "trumpet"),
        Instrument("vibraphone", "lead", 0, 0.8, _vibraphone, "vibraphone"),
        Instrument("bass guitar", "bass", -2, 0.08, _bass_guitar, "bass guitar"),
        Instrument("upright bass", "bass", -2, 0.15, _upright_bass, "upright bass"),
        Instrument("synth bass", "bass", -2, 0.05, _synth_bass, "synth bass"),
        Instrument("808 bass", "bass", -2, 0.2, _bass_808, "booming 808 bass"),
    ]
}

# --------------------------------------------------------------------------------------------
# Drums
# --------------------------------------------------------------------------------------------


def _drum_kit(sr: int, rng: np.random.Generator, tone: float) -> dict[str, np.ndarray]:
    """One-shot drum samples synthesised from decaying sines and filtered noise."""
    t = np.arange(int(0.5 * sr)) / sr
    kick_f = 45.0 + 110.0 * np.exp(-t / 0.03)
    kick = np.sin(2 * np.pi * np.cumsum(kick_f) / sr) * np.exp(-t / (0.12 + 0.1 * tone))
    kick[: int(0.002 * sr)] += rng.uniform(-0.3, 0.3, int(0.002 * sr))  # beater click
    ts = t[: int(0.3 * sr)]
    noise = rng.standard_normal(ts.size)
    snare = 0.6 * np.sin(2 * np.pi * 185.0 * ts) * np.exp(-ts / 0.05)
    snare += 0.7 * _lowpass(noise, 6000.0, sr) * np.exp(-ts / 0.09)
    clap = np.zeros_like(ts)
    for delay in (0.0, 0.011, 0.022):
        start = int(delay * sr)
        clap[start:] += np.exp(-ts[: ts.size - start] / (0.012 if delay < 0.02 else 0.08))
    clap *= np.diff(noise, prepend=0.0) * 0.5
    th = t[: int(0.25 * sr)]
    hiss = np.diff(rng.standard_normal(th.size + 1))  # first difference: a crude highpass
    hat = 0.35 * hiss * np.exp(-th / 0.025)
    open_hat = 0.3 * hiss * np.exp(-th / 0.15)
    tr = t[: int(0.5 * sr)]
    metal = sum(np.sign(np.sin(2 * np.pi * f * tr)) for f in (380.0, 545.0, 812.0, 1175.0))
    ride = 0.12 * (np.diff(metal, prepend=0.0) + 0.5 * np.diff(rng.standard_normal(tr.size), prepend=0.0))
    ride *= np.exp(-tr / 0.35)
    rim = np.sin(2 * np.pi * 1700.0 * ts[: int(0.05 * sr)]) * np.exp(-ts[: int(0.05 * sr)] / 0.008)
    return {
        k: v.astype(np.float32)
        for k, v in dict(kick=kick, snare=snare, clap=clap, hat=hat, open_hat=open_hat, ride=ride, rim=rim).items()
    }


# Drum patterns on a 16th-note grid of one 4/4 bar (step -> velocity) or 12 steps for 3/4.
DRUM_PATTERNS: dict[str, dict[str, dict[int, float]]] = {
    "four-on-the-floor": {
        "kick": {0: 1.0, 4: 1.0, 8: 1.0, 12: 1.0},
        "clap": {4: 0.8, 12: 0.8},
        "open_hat": {2: 0.7, 6: 0.7, 10: 0.7, 14: 0.7},
        "hat": {s: 0.35 for s in range(16) if s % 2},
    },
    "rock beat": {
        "kick": {0: 1.0, 7: 0.7, 8: 1.0, 10: 0.8},
        "snare": {4: 1.0, 12: 1.0},
        "hat": {s: (0.8 if s % 4 == 0 else 0.55) for s in range(0, 16, 2)},
    },
    "boom bap": {
        "kick": {0: 1.0, 7: 0.8, 10: 0.9},
        "snare": {4: 1.0, 12: 1.0},
        "hat": {s: (0.7 if s % 4 == 0 else 0.45) for s in range(0, 16, 2)},
    },
    "one drop": {
        "kick": {8: 1.0},
        "rim": {8: 0.9},
        "hat": {s: (0.6 if s % 4 == 2 else 0.35) for s in range(0, 16, 2)},
    },
    "swing ride": {
        "ride": {0: 0.8, 4: 0.8, 6: 0.5, 8: 0.8, 12: 0.8, 14: 0.5},
        "hat": {4: 0.5, 12: 0.5},
        "kick": {0: 0.35, 8: 0.3},
    },
    "folk shuffle": {
        "kick": {0: 0.9, 8: 0.8},
        "snare": {4: 0.5, 12: 0.5},
        "hat": {s: 0.3 for s in range(0, 16, 2)},
    },
    "waltz": {
        "kick": {0: 0.9},
        "snare": {4: 0.45, 8: 0.45},
        "hat": {s: 0.3 for s in range(0, 12, 2)},
    },
    "funk groove": {
        "kick": {0: 1.0, 3: 0.6, 10: 0.9},
        "snare": {4: 1.0, 7: 0.35, 12: 1.0, 15: 0.35},
        "hat": {s: (0.6 if s % 2 == 0 else 0.3) for s in range(16)},
    },
}

# --------------------------------------------------------------------------------------------
# Genre templates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Genre:
    """What a genre fixes: the ranges and choices :func:`sample_params` draws from."""

    name: str
    bpm: tuple[int, int]
    modes: tuple[str, ...]
    drum_probability: float
    drum_pattern: str
    progressions: tuple[tuple[int, ...], ...]  # chord roots as scale degrees, one chord per `chord_beats`
    chord_beats: int
    comping: str  # how the chord instrument plays: sustained, block, arpeggio, offbeat, stabs, strum, eighths
    bass_style: str  # roots, walking, offbeat, eighths, drone, syncopated, sustained
    chord_instruments: tuple[str, ...]
    lead_instruments: tuple[str, ...]
    bass_instruments: tuple[str, ...]
    swing: tuple[float, float]
    dynamics: tuple[str, ...]
    melody_density: float  # notes per beat, roughly
    seventh_chords: bool
    reverb: float
    beats_per_bar: int
    moods: tuple[str, ...]
    adjectives: tuple[str, ...]
    settings: tuple[str, ...]  # "This song could be played ..." endings


GENRES: dict[str, Genre] = {
    g.name: g
    for g in [
        Genre(
            "rock", (100, 150), ("major", "minor"), 1.0, "rock beat",
            ((0, 3, 4, 3), (0, 4, 5, 3), (0, 6, 3, 0), (5, 3, 0, 4)), 4, "eighths", "eighths",
            ("distorted guitar",), ("synth lead", "organ", "trumpet"), ("bass guitar",),
            (0.0, 0.0), ("loud", "loud", "crescendo"), 1.5, False, 0.12, 4,
            ("energetic", "rebellious", "powerful"), ("energetic", "driving", "raw"),
            ("at a live concert", "in a sports highlight reel", "on a road trip"),
        ),
        Genre(
            "techno", (120, 140), ("minor",), 1.0, "four-on-the-floor",
            ((0, 0, 5, 6), (0, 5, 3, 4), (0, 3, 0, 3)), 4, "stabs", "offbeat",
            ("synth pad", "electric piano"), ("synth lead",), ("synth bass",),
            (0.0, 0.0), ("loud", "medium", "crescendo"), 1.2, False, 0.2, 4,
            ("hypnotic", "danceable", "euphoric"), ("pulsing", "hypnotic", "upbeat"),
            ("in a nightclub", "at a rave", "during a workout"),
        ),
        Genre(
            "jazz", (90, 160), ("major", "minor"), 0.85, "swing ride",
            ((1, 4, 0, 5), (1, 4, 0, 0), (0, 5, 1, 4)), 4, "block", "walking",
            ("piano", "electric piano", "vibraphone"), ("trumpet", "vibraphone", "flute"), ("upright bass",),
            (0.5, 0.8), ("soft", "medium"), 1.5, True, 0.25, 4,
            ("relaxed", "sophisticated", "playful"), ("swinging", "smooth", "laid-back"),
            ("in a jazz club", "in a cozy café", "at a cocktail bar"),
        ),
        Genre(
            "ambient", (60, 85), ("major", "minor"), 0.0, "folk shuffle",
            ((0, 3), (0, 5), (0, 4, 5, 3), (5, 3)), 8, "sustained", "drone",
            ("synth pad", "strings"), ("flute", "vibraphone", "electric piano"), ("synth bass",),
            (0.0, 0.0), ("soft", "soft", "crescendo"), 0.4, True, 0.6, 4,
            ("calm", "dreamy", "meditative"), ("atmospheric", "spacious", "slow"),
            ("during meditation", "in a documentary about space", "while studying"),
        ),
        Genre(
            "classical", (70, 120), ("major", "minor"), 0.0, "waltz",
            ((0, 3, 4, 0), (0, 5, 3, 4), (0, 4, 5, 2, 3, 0, 3, 4)), 3, "arpeggio", "roots",
            ("piano", "strings"), ("flute", "piano", "strings"), ("upright bass",),
            (0.0, 0.0), ("soft", "medium", "crescendo"), 1.5, False, 0.45, 3,
            ("elegant", "romantic", "melancholic"), ("elegant", "graceful", "gentle"),
            ("in a concert hall", "in a period film", "at a wedding ceremony"),
        ),
        Genre(
            "reggae", (70, 95), ("major", "minor"), 1.0, "one drop",
            ((0, 3, 0, 3), (0, 4, 3, 0), (0, 5, 3, 4)), 4, "offbeat", "syncopated",
            ("organ", "electric piano", "acoustic guitar"), ("trumpet", "synth lead", "flute"), ("bass guitar",),
            (0.1, 0.3), ("medium",), 1.0, False, 0.2, 4,
            ("laid-back", "happy", "sunny"), ("laid-back", "groovy", "sunny"),
            ("at a beach party", "on a summer afternoon", "at a street festival"),
        ),
        Genre(
            "hip hop", (80, 100), ("minor",), 1.0, "boom bap",
            ((0, 5, 3, 4), (0, 0, 5, 5), (0, 3, 5, 4)), 4, "sustained", "sustained",
            ("electric piano", "piano", "strings"), ("synth lead", "flute", "vibraphone"), ("808 bass",),
            (0.2, 0.5), ("medium", "loud"), 1.0, True, 0.15, 4,
            ("chill", "confident", "moody"), ("head-nodding", "mellow", "gritty"),
            ("in a skate video", "during a late-night drive", "as background for a vlog"),
        ),
        Genre(
            "folk", (90, 125), ("major",), 0.5, "folk shuffle",
            ((0, 3, 0, 4), (0, 4, 5, 3), (0, 3, 4, 0)), 4, "strum", "roots",
            ("acoustic guitar",), ("flute", "vibraphone", "piano"), ("upright bass", "bass guitar"),
            (0.0, 0.3), ("soft", "medium"), 1.2, False, 0.2, 4,
            ("warm", "nostalgic", "hopeful"), ("warm", "acoustic", "heartfelt"),
            ("around a campfire", "in a countryside film scene", "at a farmers market"),
        ),
        Genre(
            "funk", (95, 120), ("minor", "major"), 1.0, "funk groove",
            ((0, 3), (0, 0, 3, 3), (0, 6, 5, 4)), 4, "stabs", "syncopated",
            ("electric piano", "organ"), ("trumpet", "synth lead"), ("bass guitar", "synth bass"),
            (0.0, 0.25), ("loud", "medium"), 1.3, True, 0.12, 4,
            ("groovy", "funky", "playful"), ("groovy", "tight", "punchy"),
            ("at a house party", "in a retro TV show", "on a dance floor"),
        ),
    ]
}

# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------

# Rhythm cells for one bar of melody: (duration in beats, is_rest)
_CELLS_4 = [
    [(1, 0), (1, 0), (1, 0), (1, 0)],
    [(2, 0), (1, 0), (1, 0)],
    [(1.5, 0), (0.5, 0), (1, 0), (1, 0)],
    [(0.5, 0)] * 8,
    [(3, 0), (1, 1)],
    [(1, 0), (0.5, 0), (0.5, 0), (2, 0)],
    [(0.5, 1), (0.5, 0), (1, 0), (0.5, 0), (0.5, 0), (1, 0)],
    [(4, 0)],
    [(2, 0), (2, 0)],
    [(0.5, 0), (0.5, 0), (1, 0), (0.5, 0), (0.5, 0), (1, 1)],
]
_CELLS_3 = [
    [(1, 0), (1, 0), (1, 0)],
    [(2, 0), (1, 0)],
    [(1.5, 0), (0.5, 0), (1, 0)],
    [(0.5, 0)] * 6,
    [(3, 0)],
    [(1, 0), (0.5, 0), (0.5, 0), (1, 0)],
]


def _cell_density(cell: list) -> float:
    return sum(1 for _, rest in cell if not rest) / sum(d for d, _ in cell)


def _generate_melody(
    rng: np.random.Generator, genre: Genre, progression: list[int], beats_per_bar: int, chord_beats: int, bars: int
) -> list[list[float]]:
    """A phrase ``[[degree, onset_beat, duration_beats], ...]`` over ``bars`` bars.

    Rhythm cells are drawn near the genre's note density; the A A' B A'' form repeats bar rhythms;
    pitches random-walk over the scale and land on chord tones on strong beats; the phrase ends on a
    chord tone held long. Degrees are relative to the tonic of the lead's register.
    """
    cells = _CELLS_4 if beats_per_bar == 4 else _CELLS_3
    weights = np.array([np.exp(-2.0 * abs(_cell_density(c) - genre.melody_density)) for c in cells])
    weights /= weights.sum()
    motif = [cells[int(i)] for i in rng.choice(len(cells), size=2, p=weights)]
    rhythm = [motif[bar % 2] if bar % 4 != 2 else cells[int(rng.choice(len(cells), p=weights))] for bar in range(bars)]
    melody: list[list[float]] = []
    degree = int(rng.integers(2, 7))
    steps, step_p = np.array([-3, -2, -1, 0, 1, 2, 3, 4]), np.array([0.05, 0.17, 0.25, 0.08, 0.25, 0.12, 0.05, 0.03])
    for bar, cell in enumerate(rhythm):
        onset = bar * beats_per_bar
        for dur, rest in cell:
            if not rest:
                degree = int(np.clip(degree + rng.choice(steps, p=step_p), -2, 9))
                chord_root = progression[int(onset // chord_beats) % len(progression)]
                if float(onset).is_integer() and int(onset) % 2 == 0:
                    tones = [chord_root + i + 7 * o for i in (0, 2, 4) for o in (-1, 0, 1)]
                    degree = min(tones, key=lambda d: (abs(d - degree), d))
                melody.append([int(degree), float(onset), float(dur)])
            onset += dur
    if melody:  # cadence: the last note becomes a tonic-chord tone, held to the end of the phrase
        last = melody[-1]
        last[0] = min((0, 2, 4, 7, 9), key=lambda d: abs(d - last[0]))
        last[2] = float(bars * beats_per_bar - last[1])
    return melody


def sample_params(rng: np.random.Generator, genre: str | None = None) -> dict:
    """Draw one clip's musical parameters (JSON-serialisable) from a genre template."""
    g = GENRES[genre] if genre is not None else GENRES[sorted(GENRES)[int(rng.integers(len(GENRES)))]]

    def pick(options):
        return options[int(rng.integers(len(options)))]

    progression = list(pick(g.progressions))
    key_index = int(rng.integers(12))
    mode = pick(g.modes)
    bars = max(4, len(progression) * g.chord_beats // g.beats_per_bar)
    chord_instrument = pick(g.chord_instruments)
    leads = [name for name in g.lead_instruments if name != chord_instrument] or list(g.lead_instruments)
    lead = pick(leads)  # a different timbre from the chords where the genre allows it
    return {
        "genre": g.name,
        "bpm": int(rng.integers(g.bpm[0], g.bpm[1] + 1)),
        "key": KEYS[key_index],
        "mode": mode,
        "tonic_midi": 60 + key_index if key_index < 6 else 48 + key_index,  # keep the register central
        "beats_per_bar": g.beats_per_bar,
        "progression": progression,
        "chord_beats": g.chord_beats,
        "seventh_chords": g.seventh_chords,
        "comping": g.comping,
        "bass_style": g.bass_style,
        "chord_instrument": chord_instrument,
        "lead_instrument": lead,
        "bass_instrument": pick(g.bass_instruments),
        "drums": bool(rng.random() < g.drum_probability),
        "drum_pattern": g.drum_pattern,
        "swing": round(float(rng.uniform(*g.swing)), 3),
        "dynamics": pick(g.dynamics),
        "mood": pick(g.moods),
        "reverb": g.reverb,
        "melody_beats": bars * g.beats_per_bar,
        "melody": _generate_melody(rng, g, progression, g.beats_per_bar, g.chord_beats, bars),
        "seed": int(rng.integers(2**31)),
    }


# --------------------------------------------------------------------------------------------
# Arrangement and rendering
# --------------------------------------------------------------------------------------------


def _swung(beat: float, swing: float) -> float:
    """Delay off-beat eighths by up to a sixteenth-triplet (swing 1.0 = triplet feel)."""
    frac = beat - np.floor(beat)
    if abs(frac - 0.5) < 1e-6:
        return beat + swing / 6.0
    if abs(frac - 0.25) < 1e-6 or abs(frac - 0.75) < 1e-6:
        return beat + swing / 12.0
    return beat


def _chord_degrees(root: int, seventh: bool) -> list[int]:
    return [root, root + 2, root + 4] + ([root + 6] if seventh else [])


def _arrange(params: dict, total_beats: float) -> list[tuple[str, float, float, float, float]]:
    """Notes ``(instrument, midi, onset_beat, duration_beats, velocity)`` for chords, bass and melody."""
    tonic, mode = params["tonic_midi"], params["mode"]
    bpb, chord_beats = params["beats_per_bar"], params["chord_beats"]
    progression = params["progression"]
    chord_inst = INSTRUMENTS[params["chord_instrument"]]
    bass_inst = INSTRUMENTS[params["bass_instrument"]]
    lead_inst = INSTRUMENTS[params["lead_instrument"]]
    notes: list[tuple[str, float, float, float, float]] = []

    def chord_midis(root: int) -> list[int]:
        midis = [degree_to_midi(d, tonic, mode) + 12 * chord_inst.octave for d in _chord_degrees(root, params["seventh_chords"])]
        return [m - 12 if m > 72 else m for m in midis]  # keep voicings below C5

    n_chords = int(np.ceil(total_beats / chord_beats))
    for c in range(n_chords):
        start = c * chord_beats
        root = progression[c % len(progression)]
        midis = chord_midis(root)
        style = params["comping"]
        if chord_inst.name == "distorted guitar":
            midis = [degree_to_midi(root, tonic, mode) - 12]  # a power chord is one (root) "note"
        if style == "sustained":
            notes += [(chord_inst.name, m, start, chord_beats, 0.7) for m in midis]
        elif style == "block":  # jazz comping: chords on 1 and the "and" of 2 (or random beats)
            for on in (0.0, 1.5, 2.5 if c % 2 else 3.0):
                if on < chord_beats:
                    notes += [(chord_inst.name, m, start + on, 0.9, 0.6) for m in midis]
        elif style == "arpeggio":
            pattern = [0, 1, 2, 1, 2, 1] if bpb == 3 else [0, 1, 2, 3 % len(midis), 2, 1, 2, 1]
            for i, p in enumerate(pattern * (chord_beats // bpb)):
                notes.append((chord_inst.name, midis[p % len(midis)], start + 0.5 * i, 0.6, 0.55 if i % 2 else 0.7))
        elif style == "offbeat":  # reggae skank
            for beat in range(chord_beats):
                notes += [(chord_inst.name, m + 12, start + beat + 0.5, 0.3, 0.6) for m in midis]
        elif style == "stabs":
            for on in (0.5, 1.75, 2.5, 3.5):
                if on < chord_beats:
                    notes += [(chord_inst.name, m, start + on, 0.35, 0.65) for m in midis]
        elif style == "strum":
            for beat in range(chord_beats):
                for i, m in enumerate(midis + [midis[0] + 12]):
                    notes.append((chord_inst.name, m, start + beat + 0.012 * i, 0.9, 0.55 if beat % 2 else 0.7))
        else:  # "eighths": driving rock eighth notes
            for i in range(2 * chord_beats):
                notes += [(chord_inst.name, m, start + 0.5 * i, 0.45, 0.8 if i % 2 == 0 else 0.65) for m in midis]

        bass_root = degree_to_midi(root, tonic, mode) + 12 * bass_inst.octave
        while bass_root < 28:
            bass_root += 12
        fifth = bass_root + 7
        bass = params["bass_style"]
        if bass == "walking":
            line = [bass_root, degree_to_midi(root + 2, tonic, mode) + 12 * bass_inst.octave, fifth]
            next_root = degree_to_midi(progression[(c + 1) % len(progression)], tonic, mode) + 12 * bass_inst.octave
            line.append(next_root + (1 if next_root < bass_root else -1))  # chromatic approach
            notes += [(bass_inst.name, m, start + i, 0.9, 0.75) for i, m in enumerate((line * chord_beats)[:chord_beats])]
        elif bass == "offbeat":
            notes += [(bass_inst.name, bass_root, start + b + 0.5, 0.4, 0.8) for b in range(chord_beats)]
        elif bass == "eighths":
            notes += [(bass_inst.name, bass_root, start + 0.5 * i, 0.45, 0.8) for i in range(2 * chord_beats)]
        elif bass == "drone":
            notes.append((bass_inst.name, bass_root, start, chord_beats, 0.6))
        elif bass == "syncopated":
            for on, m in ((0.0, bass_root), (0.75, bass_root), (1.5, fifth), (2.5, bass_root + 12), (3.0, fifth)):
                if on < chord_beats:
                    notes.append((bass_inst.name, m, start + on, 0.4, 0.8))
        elif bass == "sustained":  # hip hop 808: long notes on 1 and the "and" of 3
            notes.append((bass_inst.name, bass_root, start, 2.25, 0.85))
            notes.append((bass_inst.name, bass_root, start + 2.5, 1.25, 0.7))
        else:  # "roots"
            for b in range(0, chord_beats, bpb):
                notes.append((bass_inst.name, bass_root, start + b, bpb - 0.1, 0.75))

    phrase = float(params["melody_beats"])
    repeats = int(np.ceil(total_beats / phrase))
    for r in range(repeats):
        for degree, onset, dur in params["melody"]:
            midi = degree_to_midi(int(degree), tonic, mode) + 12 * lead_inst.octave
            notes.append((lead_inst.name, midi, r * phrase + float(onset), float(dur), 0.8))
    return [n for n in notes if n[2] < total_beats]


def _dynamics_curve(dynamics: str, n: int) -> np.ndarray:
    if dynamics == "crescendo":
        return np.linspace(0.25, 1.0, n, dtype=np.float32) ** 1.5
    return np.ones(n, np.float32)


_VELOCITY = {"soft": 0.55, "medium": 0.8, "loud": 1.0, "crescendo": 0.9}
_PEAK_DBFS = {"soft": -7.0, "medium": -2.0, "loud": -1.0, "crescendo": -1.0}
_ROLE_GAIN = {"chords": 0.45, "lead": 0.6, "bass": 0.7, "drums": 0.6}


def render_clip(params: dict, seconds: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Synthesise ``params`` into float32 mono ``[round(seconds * sample_rate)]``.

    The arrangement loops (progression, melody phrase, drum bar) to fill the clip, so any tempo
    and any clip length work. The peak is normalised to the dynamics' level (-1 dBFS for loud and
    crescendo clips, -7 dBFS for soft ones so that "soft" stays audible as quieter).
    """
    sr = int(sample_rate)
    n = int(round(seconds * sr))
    rng = np.random.default_rng(int(params["seed"]))
    spb = 60.0 / float(params["bpm"])  # seconds per beat
    total_beats = seconds / spb
    swing = float(params["swing"])
    vel_scale = _VELOCITY[params["dynamics"]]
    tail = int(2.0 * sr)
    stems = {role: np.zeros(n + tail, np.float32) for role in _ROLE_GAIN}

    def place(stem: np.ndarray, sound: np.ndarray, start_s: float, gain: float) -> None:
        start = int(round(start_s * sr))
        if start >= n or start < 0:
            return
        end = min(start + sound.size, stem.size)
        stem[start:end] += gain * sound[: end - start]

    for name, midi, onset, dur, vel in _arrange(params, total_beats):
        inst = INSTRUMENTS[name]
        start_s = _swung(onset, swing) * spb + float(rng.normal(0.0, 0.004))  # a human's timing
        velocity = float(np.clip(vel * vel_scale * rng.uniform(0.9, 1.05), 0.05, 1.0))
        sound = inst.render(midi_to_hz(midi), max(0.05, dur * spb * 0.95), velocity, sr, rng)
        place(stems[inst.role], sound, max(0.0, start_s), 1.0)

    if params["drums"]:
        kit = _drum_kit(sr, rng, tone=rng.random())
        pattern = DRUM_PATTERNS[params["drum_pattern"]]
        steps_per_bar = 4 * params["beats_per_bar"]
        bars = int(np.ceil(total_beats / params["beats_per_bar"]))
        for bar in range(bars):
            for drum, hits in pattern.items():
                for step, vel in hits.items():
                    if step >= steps_per_bar:
                        continue
                    beat = bar * params["beats_per_bar"] + step / 4.0
                    velocity = vel * vel_scale * rng.uniform(0.85, 1.05)
                    place(stems["drums"], kit[drum], _swung(beat, swing) * spb, velocity)

    mix = sum(_ROLE_GAIN[role] * stem for role, stem in stems.items())[:n]
    if params["reverb"] > 0:  # exponentially decaying noise as a room impulse response
        ir_t = np.arange(int(1.2 * sr)) / sr
        ir = rng.standard_normal(ir_t.size) * np.exp(-ir_t / 0.35)
        ir = _lowpass(ir, 5000.0, sr)
        wet = _convolve(mix, ir)[:n]
        wet *= np.abs(mix).max() / max(np.abs(wet).max(), 1e-9)
        mix = mix + params["reverb"] * wet
    mix = mix * _dynamics_curve(params["dynamics"], n)
    mix -= mix.mean()
    peak = float(np.abs(mix).max())
    if not np.isfinite(peak) or peak < 1e-9:
        raise RuntimeError(f"rendered silence or non-finite audio for {params['genre']} (seed {params['seed']})")
    target = 10.0 ** (_PEAK_DBFS[params["dynamics"]] / 20.0)
    return (mix * (target / peak)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _tempo_word(bpm: int) -> str:
    return "slow tempo" if bpm < 85 else "medium tempo" if bpm < 115 else "fast tempo"


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def describe(params: dict, rng: np.random.Generator) -> tuple[str, list[str]]:
    """A MusicCaps-style caption (several varied sentences) and an aspect list for ``params``."""
    g = GENRES[params["genre"]]
    adjective = g.adjectives[int(rng.integers(len(g.adjectives)))]
    lead = INSTRUMENTS[params["lead_instrument"]].words
    chords = INSTRUMENTS[params["chord_instrument"]].words
    bass = INSTRUMENTS[params["bass_instrument"]].words
    key = f"{params['key']} {params['mode']}"
    tempo = _tempo_word(params["bpm"])
    bpm = params["bpm"]
    dyn = params["dynamics"]
    mood = params["mood"]
    drums = params["drums"]
    pattern = params["drum_pattern"]

    openers = [
        f"This is {_article(adjective)} {adjective} {g.name} track featuring {_article(lead)} {lead} melody over {_article(chords)} {chords} and {_article(bass)} {bass}.",
        f"{_article(adjective).capitalize()} {adjective} {g.name} piece in {key} at {bpm} BPM, led by {_article(lead)} {lead}.",
        f"The song is {_article(g.name)} {g.name} instrumental where {_article(lead)} {lead} plays the melody while {_article(chords)} {chords} holds the harmony.",
        f"This {g.name} recording has {_article(chords)} {chords}, {_article(bass)} {bass} and {_article(lead)} {lead} playing the main tune.",
    ]
    opener = int(rng.integers(len(openers)))
    sentences = [openers[opener]]
    if drums:
        drum_lines = {
            "four-on-the-floor": "a four-on-the-floor kick with off-beat open hi-hats and claps",
            "rock beat": "a driving rock beat with a backbeat snare",
            "boom bap": "a boom bap drum groove with a punchy kick and snare",
            "one drop": "a one drop rhythm with a rim shot on the third beat",
            "swing ride": "a swinging ride cymbal pattern with soft brushes of kick",
            "folk shuffle": "a light, simple drum beat",
            "waltz": "a gentle waltz beat",
            "funk groove": "a syncopated funk groove with ghost notes on the snare",
        }
        sentences.append(f"The drums play {drum_lines[pattern]}.")
    else:
        sentences.append(
            ["There are no drums in this song.", "There is no percussion.", "The track has no drums."][int(rng.integers(3))]
        )
    tempo_lines = [
        f"The tempo is {tempo.split()[0]} at {bpm} BPM and the song is in {key}.",
        f"It is played at {_article(tempo)} {tempo} of {bpm} BPM in the key of {key}.",
    ]
    if opener == 1:  # key and BPM already said
        tempo_lines = [f"The tempo is {tempo.split()[0]}.", f"It moves at {_article(tempo)} {tempo}."]
    sentences.append(tempo_lines[int(rng.integers(len(tempo_lines)))])
    dyn_line = {
        "soft": "The music is played softly and quietly.",
        "medium": "The dynamics are moderate.",
        "loud": "The music is loud and full.",
        "crescendo": "The music starts quietly and builds up in a crescendo.",
    }[dyn]
    if params["swing"] >= 0.3:
        dyn_line += " The rhythm has a swing feel."
    sentences.append(dyn_line)
    sentences.append(f"The mood is {mood}. This song could be played {g.settings[int(rng.integers(len(g.settings)))]}.")

    aspects = [
        g.name,
        lead,
        chords,
        bass,
        tempo,
        f"{bpm} bpm",
        mood,
        adjective,
        "drums" if drums else "no drums",
        *([pattern] if drums else []),
        key.lower(),
        f"{params['mode']} key",
        {"soft": "soft", "medium": "medium volume", "loud": "loud", "crescendo": "crescendo"}[dyn],
        "instrumental",
    ]
    if params["swing"] >= 0.3:
        aspects.append("swing")
    return " ".join(sentences), list(dict.fromkeys(aspects))


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def _clip_params(seed: int, index: int) -> dict:
    """Clip ``index``'s parameters: genres cycle through a seed-shuffled order (balanced corpus)."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(sorted(GENRES))
    rng = np.random.default_rng([seed, index])
    return sample_params(rng, genre=str(order[index % len(order)]))


def _make_clip(job: tuple[int, int, float, int]) -> tuple[bytes, dict]:
    seed, index, seconds, sample_rate = job
    params = _clip_params(seed, index)
    caption, aspects = describe(params, np.random.default_rng([seed, index, 1]))
    wav = render_clip(params, seconds, sample_rate)
    clip_id = f"clip_{index:05d}"
    record = {"file": f"audio/{clip_id}.wav", "id": clip_id, "caption": caption, "aspects": aspects, "params": params}
    return encode_wav(wav, sample_rate), record


def generate_corpus(
    out_dir: str,
    clips: int,
    seconds: float,
    seed: int,
    sample_rate: int = SAMPLE_RATE,
    progress: bool = True,
    workers: int | None = None,
) -> list[dict]:
    """Write ``clips`` procedurally composed clips and their captions under ``out_dir`` (path or URL).

    Layout: ``out_dir/audio/clip_00000.wav`` … (mono 16-bit WAV) and ``out_dir/captions.jsonl`` (one
    ``{"file", "id", "caption", "aspects", "params"}`` record per clip, in clip order). ``workers``
    processes render in parallel (default: up to 2 for 8 clips or more); the output does not depend
    on it. Returns the records.
    """
    if clips < 0 or seconds <= 0:
        raise ValueError(f"need clips >= 0 and seconds > 0, got clips={clips}, seconds={seconds}")
    from tqdm.auto import tqdm

    fs, root = fsspec.core.url_to_fs(str(out_dir))
    root = root.rstrip("/")
    fs.makedirs(f"{root}/audio", exist_ok=True)
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if clips >= 8 else 1
    jobs = [(int(seed), i, float(seconds), int(sample_rate)) for i in range(clips)]
    records: list[dict] = []
    bar = tqdm(total=clips, desc="demo corpus", unit="clip", disable=not progress)

    def write(result: tuple[bytes, dict]) -> None:
        data, record = result
        with fs.open(f"{root}/{record['file']}", "wb") as f:
            f.write(data)
        records.append(record)
        bar.update(1)

    try:
        if workers > 1:
            # spawn: a fresh interpreter per worker, safe under Ray/Beam/torch threads
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                for result in pool.map(_make_clip, jobs, chunksize=max(1, min(8, clips // (4 * workers)))):
                    write(result)
        else:
            for job in jobs:
                write(_make_clip(job))
    finally:
        bar.close()
    with fs.open(f"{root}/captions.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    return records
