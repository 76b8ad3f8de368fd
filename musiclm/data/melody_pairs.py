"""Training pairs for the melody embedder: the same melody with different acoustics.

The melody embedder (appendix C) learns with a triplet loss whose positives share a *melody* and
differ in everything else. Two sources of such groups:

- :func:`generate_melody_corpus` (offline demo): each random melody is rendered several times,
  each rendition with its own timbre (the demo corpus's instruments, a hum-like voice, a
  whistle), tempo (+-15 % around the melody's own), accompaniment (none, or chords and bass in the
  melody's key or a closely related one: relative, subdominant, dominant), drums, reverb and start
  offset. Files and a ``captions.jsonl`` whose rows carry ``"melody_group"``.
- a users' manifest (:func:`load_melody_pairs`): JSONL rows ``{"audio": URI, "melody_group": str,
  "caption"?: str}`` for covers, instrumentals and vocals of one song.

What "same melody" means here. Within a group the melody keeps its *pitch classes*: a timbre may
move it by whole octaves into its register (a whistle sits two octaves above a hum), but it is
never transposed, and only the accompaniment changes key. Transposing whole renditions would
leave a pitch-based embedder just two ways to call them the same, both bad: ignore absolute pitch
entirely (then a conditioned output may come back in any key) or fail on the positives. Keeping
the melody's pitch classes and moving the accompaniment's harmony instead teaches what the
embedder must learn: follow the lead line, not the chords under it. (The adherence metric,
:mod:`musiclm.evaluation.melody`, is key-invariant on purpose: a user's hum in another key still
counts as the same melody.)

Everything is numpy and a pure function of ``(seed, melody index, rendition index)``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import Any

import fsspec
import numpy as np

from musiclm.audio.io import encode_wav
from musiclm.constants import SAMPLE_RATE
from musiclm.data import demo_corpus as dc

__all__ = [
    "MELODY_TIMBRES",
    "Melody",
    "Rendition",
    "as_melody",
    "check_melody_groups",
    "corpus_melody",
    "generate_melody_corpus",
    "load_melody_pairs",
    "render_hum",
    "render_rendition",
    "render_whistle",
    "sample_rendition",
    "write_demo_hum",
]

# instruments of the demo corpus that can carry a single melody line (no power chords, no slow pads, no bass)
INSTRUMENT_TIMBRES = ("piano", "electric piano", "organ", "acoustic guitar", "strings", "flute", "synth lead",
                      "trumpet", "vibraphone")
VOICE_TIMBRES = ("hum", "whistle")
MELODY_TIMBRES = INSTRUMENT_TIMBRES + VOICE_TIMBRES
TEMPO_RANGE = 0.15  # a rendition's tempo is the melody's times U(1 - r, 1 + r)
# accompaniment keys that keep the melody singable over them: (name, tonic offset in semitones, mode change)
ACCOMPANIMENT_KEYS = ("same", "relative", "subdominant", "dominant")
VOWELS: dict[str, tuple[tuple[float, float, float], ...]] = {
    # (formant Hz, bandwidth Hz, gain): a nasal "mm", and the vowels "oo" and "ah" (adult averages)
    "mm": ((260.0, 90.0, 1.0), (1150.0, 250.0, 0.08), (2300.0, 300.0, 0.03)),
    "oo": ((320.0, 80.0, 1.0), (870.0, 100.0, 0.35), (2250.0, 150.0, 0.08)),
    "ah": ((730.0, 90.0, 1.0), (1090.0, 110.0, 0.55), (2440.0, 170.0, 0.2)),
}
_MELODY_TAG, _RENDITION_TAG = 0x3E10, 0x4E4D
_CONTROL = 64  # samples per control-rate step of the voice synthesis (2.7 ms at 24 kHz)


# --------------------------------------------------------------------------------------------
# Melodies and renditions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Melody:
    """A phrase of absolute pitches that loops: ``notes`` are ``(MIDI pitch, onset beat, duration beats)``.

    ``bpm`` is the melody's own tempo (renditions scale it); key, mode and chord progression are what
    an accompaniment in the melody's key plays under it.
    """

    notes: tuple[tuple[int, float, float], ...]
    beats: float
    bpm: float
    tonic_midi: int
    mode: str
    progression: tuple[int, ...]
    chord_beats: int
    beats_per_bar: int

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "notes": [list(n) for n in self.notes], "progression": list(self.progression)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Melody:
        return cls(**{**data, "notes": tuple(tuple(n) for n in data["notes"]),
                      "progression": tuple(data["progression"])})


def as_melody(melody: Melody | Sequence[Sequence[float]], bpm: float = 100.0) -> Melody:
    """A :class:`Melody`, or a plain note list ``[(MIDI pitch, onset beat, duration beats), ...]`` as one
    (at ``bpm``, its phrase as long as its notes, in C major for an accompaniment)."""
    if isinstance(melody, Melody):
        return melody
    notes = tuple((int(n[0]), float(n[1]), float(n[2])) for n in melody)
    if not notes or any(len(n) != 3 for n in melody) or any(on < 0 or dur <= 0 for _, on, dur in notes):
        raise ValueError("a melody needs notes (MIDI pitch, onset beat >= 0, duration beats > 0)")
    beats = float(np.ceil(max(on + dur for _, on, dur in notes)))
    return Melody(notes, beats, float(bpm), 60, "major", (0, 3, 4, 0), 4, 4)


def corpus_melody(seed: int, index: int) -> Melody:
    """Melody ``index`` of the melody corpus of ``seed``: the demo corpus's melody writer over a genre template."""
    rng = np.random.default_rng([int(seed), int(index), _MELODY_TAG])
    genre = sorted(dc.GENRES)[int(rng.integers(len(dc.GENRES)))]
    params = dc.sample_params(rng, genre=genre)
    tonic, mode = int(params["tonic_midi"]), str(params["mode"])
    notes = tuple((dc.degree_to_midi(int(d), tonic, mode), float(on), float(dur)) for d, on, dur in params["melody"])
    bpm = float(np.clip(params["bpm"], 75, 135))  # keep +-15 % renditions within a hummable range
    return Melody(notes, float(params["melody_beats"]), bpm, tonic, mode, tuple(params["progression"]),
                  int(params["chord_beats"]), int(params["beats_per_bar"]))


@dataclass(frozen=True)
class Rendition:
    """How one recording of a melody sounds: everything but the melody's pitch classes and rhythm."""

    timbre: str  # one of MELODY_TIMBRES
    bpm: float
    octave: int  # octaves the melody moves into the timbre's register (pitch classes unchanged)
    accompaniment: str | None  # None (solo) or one of ACCOMPANIMENT_KEYS
    chord_instrument: str | None
    bass_instrument: str | None
    comping: str  # sustained, arpeggio or block
    drums: bool
    reverb: float
    offset: float  # seconds of silence before the first note
    vowel: str  # hum only: "mm", "oo" or "ah"
    seed: int


def _octave_for(melody: Melody, centre: float) -> int:
    mean = float(np.mean([n[0] for n in melody.notes])) if melody.notes else 60.0
    return int(round((centre - mean) / 12.0))


_REGISTER = {"hum": 55.0, "whistle": 84.0, "acoustic guitar": 62.0, "organ": 66.0, "strings": 68.0, "flute": 74.0}


def sample_rendition(melody: Melody, rng: np.random.Generator, timbre: str) -> Rendition:
    """Draw the acoustics of one rendition with the given timbre."""
    if timbre not in MELODY_TIMBRES:
        raise ValueError(f"unknown timbre {timbre!r}; choose one of {', '.join(MELODY_TIMBRES)}")
    voice = timbre in VOICE_TIMBRES
    accompanied = bool(rng.random() < (0.4 if voice else 0.8))
    chords = [n for n in ("piano", "electric piano", "organ", "acoustic guitar", "strings", "synth pad") if n != timbre]
    centre = _REGISTER.get(timbre, 67.0) + (float(rng.choice([-12.0, 0.0])) if timbre == "hum" else 0.0)
    return Rendition(
        timbre=timbre,
        bpm=round(melody.bpm * float(rng.uniform(1 - TEMPO_RANGE, 1 + TEMPO_RANGE)), 2),
        octave=_octave_for(melody, centre),
        accompaniment=str(rng.choice(ACCOMPANIMENT_KEYS)) if accompanied else None,
        chord_instrument=str(rng.choice(chords)) if accompanied else None,
        bass_instrument=str(rng.choice(["bass guitar", "upright bass", "synth bass"])) if accompanied else None,
        comping=str(rng.choice(["sustained", "arpeggio", "block"])),
        drums=bool(accompanied and rng.random() < 0.4),
        reverb=round(float(rng.uniform(0.05, 0.4)), 3),
        offset=round(float(rng.uniform(0.0, 0.25)), 3),
        vowel=str(rng.choice(sorted(VOWELS))),
        seed=int(rng.integers(2**31)),
    )


# --------------------------------------------------------------------------------------------
# Voice-like timbres
# --------------------------------------------------------------------------------------------


def _note_events(melody: Melody, seconds: float, bpm: float, octave: int, offset: float) -> list[tuple[float, float, float]]:
    """``(f0 Hz, start s, end s)`` of the looped phrase up to ``seconds`` (octave moved, tempo ``bpm``)."""
    spb = 60.0 / bpm
    events = []
    for r in range(int(np.ceil(max(seconds - offset, 0.0) / (melody.beats * spb))) + 1):
        for midi, onset, dur in melody.notes:
            start = offset + (r * melody.beats + onset) * spb
            if start < seconds:
                events.append((dc.midi_to_hz(midi + 12 * octave), start, start + dur * spb))
    return events


def _contour(events: list[tuple[float, float, float]], n: int, sr: int, glide: float, gap: float,
             attack: float, release: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample f0 (Hz, gliding ``glide`` s into each note) and amplitude (notes re-articulated by ``gap`` s)."""
    f0 = np.zeros(n, np.float64)
    amp = np.zeros(n, np.float32)
    if not events:
        return f0 + 200.0, amp
    prev_f = events[0][0]
    for f, start, end in events:
        a, b = int(start * sr), min(n, int(max(start + 0.05, end - gap) * sr))
        if a >= n:
            break
        seg = np.arange(b - a) / sr  # [segment samples]
        ratio = np.clip(seg / glide, 0.0, 1.0) if glide > 0 else 1.0
        f0[a:b] = prev_f * (f / prev_f) ** ratio  # exponential (log-pitch linear) glide from the previous note
        rise = np.clip(seg / attack, 0.0, 1.0)
        fall = np.clip((seg[-1] - seg) / release, 0.0, 1.0) if seg.size else seg
        amp[a:b] = np.minimum(rise, fall)
        prev_f = f
    # between notes f0 holds the last pitch (only silence is heard there)
    voiced = np.flatnonzero(f0 > 0)
    f0 = np.interp(np.arange(n), voiced, f0[voiced]) if voiced.size else f0 + 200.0
    return f0, amp


def _vibrato(n: int, sr: int, rng: np.random.Generator, rate: float, depth_semitones: float) -> np.ndarray:
    """Frequency ratio ``2^(cents/1200)``: sinusoidal vibrato plus a slow random pitch drift (a singer's jitter)."""
    t = np.arange(n) / sr
    drift = dc._lowpass(rng.standard_normal(n // 240 + 2), 2.0, 100)  # [n/240] at 100 Hz, < 2 Hz wander
    drift = np.interp(t, np.arange(drift.size) / 100.0, drift / max(np.abs(drift).max(), 1e-9))
    semis = depth_semitones * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)) + 0.08 * drift
    return 2.0 ** (semis / 12.0)


def _formant_gain(freq: np.ndarray, vowel: str) -> np.ndarray:
    """Vocal-tract envelope at ``freq`` Hz: a sum of resonances (the formants) over a -12 dB/octave source."""
    env = np.full(freq.shape, 0.02)
    for centre, width, gain in VOWELS[vowel]:
        env += gain / (1.0 + ((freq - centre) / width) ** 2)
    return env


def render_hum(melody: Melody | Sequence[Sequence[float]], seconds: float, sample_rate: int = SAMPLE_RATE, *,
               bpm: float | None = None, octave: int | None = None, vowel: str = "mm", offset: float = 0.05,
               seed: int = 0) -> np.ndarray:
    """A hummed melody, float32 ``[round(seconds * sample_rate)]`` peaking at -3 dBFS.

    A harmonic glottal-like source (amplitudes ~ 1/k^2) whose harmonics are weighted by a vowel's
    formant envelope at their own frequency (additive synthesis: formants stay put as the pitch
    moves, like a voice, and nothing aliases), with vibrato fading in after each onset, a slow pitch
    drift, 40-ms glides between notes, soft re-articulation and a little breath noise.
    """
    if vowel not in VOWELS:
        raise ValueError(f"unknown vowel {vowel!r}; choose one of {', '.join(VOWELS)}")
    melody = as_melody(melody)
    if not seconds * sample_rate >= 1:
        raise ValueError(f"seconds must be positive, got {seconds}")
    sr, n = int(sample_rate), int(round(seconds * sample_rate))
    rng = np.random.default_rng([int(seed), 0x4855])
    octave = _octave_for(melody, 55.0) if octave is None else octave
    events = _note_events(melody, seconds, bpm or melody.bpm, octave, offset)
    f0, amp = _contour(events, n, sr, glide=0.04, gap=0.03, attack=0.04, release=0.06)
    f0 = f0 * _vibrato(n, sr, rng, rate=float(rng.uniform(4.8, 6.0)), depth_semitones=0.25)
    phase = np.cumsum(f0) / sr  # cycles
    out = np.zeros(n, np.float32)
    f0_ctrl = f0[::_CONTROL]  # [n / 64]: harmonic weights change slowly, compute them at a control rate
    for k in range(1, 17):  # 16 harmonics: above ~3 kHz the formant envelope is at its floor
        fk = k * f0_ctrl
        # source 1/k^2, lip radiation +6 dB/octave, the vowel's formants at the harmonic's frequency
        weight = np.where(fk < 0.45 * sr, _formant_gain(fk, vowel) / k, 0.0).astype(np.float32)
        if not weight.any():
            break
        out += np.repeat(weight, _CONTROL)[:n] * dc._lookup(dc._SINE, k * phase)
    breath = dc._lowpass(rng.standard_normal(n), 3000.0, sr) * 0.02 * float(np.abs(out).max() or 1.0)
    out = amp * (out + breath)
    return _normalise(out, -3.0)


def render_whistle(melody: Melody | Sequence[Sequence[float]], seconds: float, sample_rate: int = SAMPLE_RATE, *,
                   bpm: float | None = None, octave: int | None = None, offset: float = 0.05,
                   seed: int = 0) -> np.ndarray:
    """A whistled melody: a near-sine (a weak 2nd harmonic) two octaves up, breath noise around and
    under it, light vibrato and slides between notes; float32, -3 dBFS peak."""
    melody = as_melody(melody)
    if not seconds * sample_rate >= 1:
        raise ValueError(f"seconds must be positive, got {seconds}")
    sr, n = int(sample_rate), int(round(seconds * sample_rate))
    rng = np.random.default_rng([int(seed), 0x5748])
    octave = _octave_for(melody, 84.0) if octave is None else octave
    events = _note_events(melody, seconds, bpm or melody.bpm, octave, offset)
    f0, amp = _contour(events, n, sr, glide=0.06, gap=0.04, attack=0.03, release=0.05)
    f0 = f0 * _vibrato(n, sr, rng, rate=float(rng.uniform(4.0, 5.5)), depth_semitones=0.12)
    phase = np.cumsum(f0) / sr
    tone = dc._lookup(dc._SINE, phase) + 0.06 * dc._lookup(dc._SINE, 2 * phase)
    # breath: noise shifted onto the pitch (a band ~ +-200 Hz around f0) plus broadband hiss
    band = dc._lowpass(rng.standard_normal(n), 200.0, sr) * dc._lookup(dc._SINE, phase + 0.25)
    hiss = np.diff(rng.standard_normal(n + 1))  # first difference: a crude highpass
    out = amp * (tone + 0.5 * band / max(np.abs(band).max(), 1e-9) * 0.4 + 0.03 * hiss)
    return _normalise(out.astype(np.float32), -3.0)


def _normalise(x: np.ndarray, peak_dbfs: float) -> np.ndarray:
    x = np.asarray(x, np.float32) - np.float32(x.mean())
    peak = float(np.abs(x).max())
    if not np.isfinite(peak) or peak < 1e-9:
        raise RuntimeError("rendered silence or non-finite audio")
    return (x * (10.0 ** (peak_dbfs / 20.0) / peak)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Full renditions: lead + accompaniment + drums + room
# --------------------------------------------------------------------------------------------


def _accompaniment_key(melody: Melody, which: str) -> tuple[int, str]:
    """Tonic MIDI and mode of an accompaniment key closely related to the melody's (sharing 6-7 of its notes)."""
    tonic, mode = melody.tonic_midi, melody.mode
    if which == "relative":
        return (tonic - 3, "minor") if mode == "major" else (tonic + 3, "major")
    if which == "subdominant":
        return tonic + 5 - 12, mode
    if which == "dominant":
        return tonic + 7 - 12, mode
    return tonic, mode


def _place(track: np.ndarray, sound: np.ndarray, start_s: float, sr: int, gain: float = 1.0) -> None:
    start = int(round(start_s * sr))
    if 0 <= start < track.size:
        end = min(track.size, start + sound.size)
        track[start:end] += gain * sound[: end - start]


class _NoteCache:
    """An instrument's notes rendered once per (pitch, duration) in a rendition, like a sampler's
    recordings: a looped phrase and repeated chords cost one render per distinct note."""

    def __init__(self, name: str, sr: int, rng: np.random.Generator, velocity: float):
        self.inst, self.sr, self.rng, self.velocity = dc.INSTRUMENTS[name], sr, rng, velocity
        self.sounds: dict[tuple[float, float], np.ndarray] = {}

    def __call__(self, f0: float, seconds: float) -> np.ndarray:
        key = (round(f0, 3), round(max(0.05, seconds), 3))
        if key not in self.sounds:
            self.sounds[key] = self.inst.render(key[0], key[1], self.velocity, self.sr, self.rng)
        return self.sounds[key]


def _instrument_line(melody: Melody, r: Rendition, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    note = _NoteCache(r.timbre, sr, rng, 0.8)
    track = np.zeros(n, np.float32)
    for f0, start, end in _note_events(melody, n / sr, r.bpm, r.octave, r.offset):
        # a player's timing and dynamics: +-4 ms, +-8 % gain
        _place(track, note(f0, 0.95 * (end - start)), start + rng.normal(0, 0.004), sr, float(rng.uniform(0.92, 1.08)))
    return track


def _accompaniment(melody: Melody, r: Rendition, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Chords (sustained, arpeggiated or block) and a bass line in the rendition's accompaniment key."""
    tonic, mode = _accompaniment_key(melody, r.accompaniment or "same")
    chords, bass = _NoteCache(r.chord_instrument, sr, rng, 0.55), _NoteCache(r.bass_instrument, sr, rng, 0.7)
    spb, cb = 60.0 / r.bpm, melody.chord_beats
    track = np.zeros(n, np.float32)
    total_beats = (n / sr - r.offset) / spb
    for c in range(int(np.ceil(total_beats / cb))):
        root = melody.progression[c % len(melody.progression)]
        midis = [dc.degree_to_midi(d, tonic, mode) for d in (root, root + 2, root + 4)]
        midis = [m - 12 if m > 67 else m for m in midis]  # voiced below the melody's usual register
        start = r.offset + c * cb * spb
        if r.comping == "sustained":
            hits = [(m, 0.0, cb) for m in midis]
        elif r.comping == "arpeggio":
            hits = [(midis[i % 3], 0.5 * j, 0.5) for j, i in enumerate([0, 1, 2, 1] * cb)][: 2 * cb]
        else:
            hits = [(m, on, 0.9) for on in (0.0, 1.5, 2.5) if on < cb for m in midis]
        for m, on, dur in hits:
            _place(track, chords(dc.midi_to_hz(m), 0.95 * dur * spb), start + on * spb, sr)
        bass_midi = dc.degree_to_midi(root, tonic, mode) - 24
        while bass_midi < 31:
            bass_midi += 12
        for b in range(0, cb, 2):
            _place(track, bass(dc.midi_to_hz(bass_midi), 1.9 * spb), start + b * spb, sr, 0.8)
    return track


def _drums(r: Rendition, n: int, sr: int, rng: np.random.Generator, beats_per_bar: int) -> np.ndarray:
    kit = dc._drum_kit(sr, rng, tone=float(rng.random()))
    pattern = dc.DRUM_PATTERNS["waltz" if beats_per_bar == 3 else "rock beat"]
    spb = 60.0 / r.bpm
    track = np.zeros(n, np.float32)
    for bar in range(int(np.ceil(n / sr / (spb * beats_per_bar))) + 1):
        for drum, hits in pattern.items():
            for step, vel in hits.items():
                if step < 4 * beats_per_bar:
                    _place(track, kit[drum], r.offset + (bar * beats_per_bar + step / 4.0) * spb, sr, vel)
    return track


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) or 1e-9


def render_rendition(melody: Melody, rendition: Rendition, seconds: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One recording of ``melody``: lead (instrument, hum or whistle), optional accompaniment and drums
    mixed below it (accompaniment at 35-60 % of the lead's RMS), a room, peak -1 dBFS; float32 ``[T]``."""
    sr, n = int(sample_rate), int(round(seconds * sample_rate))
    r = rendition
    rng = np.random.default_rng(r.seed)
    if r.timbre == "hum":
        lead = render_hum(melody, seconds, sr, bpm=r.bpm, octave=r.octave, vowel=r.vowel, offset=r.offset, seed=r.seed)
    elif r.timbre == "whistle":
        lead = render_whistle(melody, seconds, sr, bpm=r.bpm, octave=r.octave, offset=r.offset, seed=r.seed)
    else:
        lead = _instrument_line(melody, r, n, sr, rng)
    mix = lead.astype(np.float32)
    if r.accompaniment is not None:
        acc = _accompaniment(melody, r, n, sr, rng)
        mix = mix + acc * (float(rng.uniform(0.35, 0.6)) * _rms(lead) / _rms(acc))
        if r.drums:
            drums = _drums(r, n, sr, rng, melody.beats_per_bar)
            mix = mix + drums * (0.5 * _rms(lead) / _rms(drums))
    if r.reverb > 0:
        ir_t = np.arange(int(0.6 * sr)) / sr
        ir = dc._lowpass(rng.standard_normal(ir_t.size) * np.exp(-ir_t / 0.25), 5000.0, sr)
        wet = dc._convolve(mix, ir)[:n]
        mix = mix + r.reverb * wet * (np.abs(mix).max() / max(np.abs(wet).max(), 1e-9))
    return _normalise(mix, -1.0)


def _describe(melody: Melody, r: Rendition) -> tuple[str, list[str]]:
    """Caption and aspects of a rendition (what it sounds like; the melody itself is in ``melody_group``)."""
    tempo = "slow tempo" if r.bpm < 85 else "medium tempo" if r.bpm < 115 else "fast tempo"
    if r.timbre == "hum":
        lead_words = {"mm": "A person hums a melody", "oo": "A voice sings a melody on 'oo'",
                      "ah": "A voice sings a melody on 'ah'"}[r.vowel]
        aspects = ["humming", "vocal melody"]
    elif r.timbre == "whistle":
        lead_words, aspects = "Someone whistles a melody", ["whistling"]
    else:
        words = dc.INSTRUMENTS[r.timbre].words
        lead_words, aspects = f"{dc._article(words).capitalize()} {words} plays a melody", [words]
    text = f"{lead_words} at {round(r.bpm)} BPM"
    if r.accompaniment is None:
        text += ", with no accompaniment."
        aspects.append("solo")
    else:
        tonic, mode = _accompaniment_key(melody, r.accompaniment)
        key = f"{dc.KEYS[tonic % 12]} {mode}"
        chords, bass = dc.INSTRUMENTS[r.chord_instrument].words, dc.INSTRUMENTS[r.bass_instrument].words
        text += f" over {_a(chords)} {chords} and {_a(bass)} {bass} in {key}"
        text += ", with a simple drum beat." if r.drums else "."
        aspects += [chords, bass, key.lower(), "drums" if r.drums else "no drums"]
    aspects += [tempo, "melody"]
    return text, list(dict.fromkeys(aspects))


def _a(word: str) -> str:
    return dc._article(word)


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def _timbres(rng: np.random.Generator, renditions: int) -> list[str]:
    """Timbres of one group: instruments and voices alternate (a hum or whistle in every group of 2+)."""
    instruments = [str(x) for x in rng.permutation(INSTRUMENT_TIMBRES)]
    voices = [str(x) for x in rng.permutation(VOICE_TIMBRES)]
    return [voices[(k // 2) % 2] if k % 2 else instruments[(k // 2) % len(instruments)] for k in range(renditions)]


def _make_rendition(job: tuple[int, int, int, int, float, int]) -> tuple[bytes, dict]:
    seed, index, k, renditions, seconds, sr = job
    melody = corpus_melody(seed, index)
    timbre = _timbres(np.random.default_rng([seed, index, _RENDITION_TAG]), renditions)[k]
    rendition = sample_rendition(melody, np.random.default_rng([seed, index, k, _RENDITION_TAG]), timbre)
    wav = render_rendition(melody, rendition, seconds, sr)
    caption, aspects = _describe(melody, rendition)
    clip_id = f"melody_{index:04d}_r{k:02d}"
    file = f"audio/{clip_id}.wav"
    record = {"file": file, "audio": file, "id": clip_id, "caption": caption, "aspects": aspects,
              "melody_group": f"melody_{index:04d}", "rendition": asdict(rendition)}
    return encode_wav(wav, sr), record


def generate_melody_corpus(
    out_dir: str,
    melodies: int = 16,
    renditions: int = 4,
    seconds: float = 10.0,
    seed: int = 0,
    sample_rate: int = SAMPLE_RATE,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write ``melodies`` x ``renditions`` recordings and their ``captions.jsonl`` under ``out_dir`` (path or URL).

    Layout: ``audio/melody_0000_r00.wav`` ... (mono 16-bit WAV at ``sample_rate``) and
    ``captions.jsonl`` (rows ``{"file", "audio", "id", "caption", "aspects", "melody_group",
    "rendition"}`` in order; "audio" makes it a valid pairs manifest for :func:`load_melody_pairs`
    and "file"/"id" a captions file for ``prepare``), and ``melodies.jsonl`` (each group's notes).
    ``workers`` processes render in parallel (default: up to 2 for 16 files or more); the output
    never depends on it.
    Returns stats: counts, audio seconds, wall seconds, timbre counts.
    """
    if melodies < 1 or renditions < 2:
        raise ValueError(f"need melodies >= 1 and renditions >= 2 (triplets need two recordings of a melody), "
                         f"got melodies={melodies}, renditions={renditions}")
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    start = time.perf_counter()
    fs, root = fsspec.core.url_to_fs(str(out_dir))
    root = root.rstrip("/")
    fs.makedirs(f"{root}/audio", exist_ok=True)
    jobs = [(int(seed), m, k, int(renditions), float(seconds), int(sample_rate))
            for m in range(melodies) for k in range(renditions)]
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if len(jobs) >= 16 else 1
    workers = max(1, int(workers))
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_make_rendition, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        results = [_make_rendition(job) for job in jobs]
    for data, record in results:
        with fs.open(f"{root}/{record['file']}", "wb") as f:
            f.write(data)
    records = [record for _, record in results]
    with fs.open(f"{root}/captions.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    with fs.open(f"{root}/melodies.jsonl", "w") as f:
        for m in range(melodies):
            f.write(json.dumps({"melody_group": f"melody_{m:04d}", **corpus_melody(seed, m).to_json()}) + "\n")
    timbres: dict[str, int] = {}
    for record in records:
        timbres[record["rendition"]["timbre"]] = timbres.get(record["rendition"]["timbre"], 0) + 1
    return {
        "melodies": melodies,
        "renditions": renditions,
        "files": len(records),
        "audio_seconds": round(len(records) * seconds, 3),
        "wall_seconds": round(time.perf_counter() - start, 3),
        "accompanied": sum(r["rendition"]["accompaniment"] is not None for r in records),
        "timbres": dict(sorted(timbres.items())),
        "captions": f"{str(out_dir).rstrip('/')}/captions.jsonl",
    }


def write_demo_hum(path: str, seed: int = 0, seconds: float = 10.0, melody_index: int = 0,
                   sample_rate: int = SAMPLE_RATE) -> dict[str, Any]:
    """Write a hum of melody ``melody_index`` of the melody corpus of ``seed`` to ``path`` (WAV, any fsspec URL).

    It is the melody of group ``melody_{melody_index:04d}`` of ``generate_melody_corpus(seed=seed)``,
    so a demo trained on that corpus is asked for a melody it has heard. Returns the melody (JSON).
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    melody = corpus_melody(seed, melody_index)
    wav = render_hum(melody, seconds, sample_rate, seed=seed)
    with fsspec.open(str(path), "wb") as f:
        f.write(encode_wav(wav, sample_rate))
    return {"path": str(path), "seconds": float(seconds), "melody_group": f"melody_{melody_index:04d}",
            "melody": melody.to_json()}


# --------------------------------------------------------------------------------------------
# Users' pairs manifest
# --------------------------------------------------------------------------------------------


def _resolve(uri: str, base: str) -> str:
    """A manifest's relative ``audio`` path is relative to the manifest's folder; URLs and absolute paths stay."""
    if "://" in uri or uri.startswith("/") or not base:
        return uri
    return f"{base}/{uri}"


def load_melody_pairs(manifest: str) -> list[dict[str, Any]]:
    """Rows ``{"audio": URI, "melody_group": str, "caption": str}`` of a pairs manifest (JSONL, any fsspec URL).

    One row per recording; rows sharing ``melody_group`` share a melody (covers, instrumentals,
    vocals). Relative ``audio`` paths resolve against the manifest's folder. Clips are matched to
    their rows by file stem downstream (``prepare``), so two different files with one stem are an
    error, as is a row without ``audio`` or with an empty ``melody_group`` (ValueError naming the line).
    """
    from musiclm.data.captions import jsonl_records, stem

    with fsspec.open(str(manifest), "r", encoding="utf-8") as f:
        text = f.read()
    base = str(manifest).rsplit("/", 1)[0] if "/" in str(manifest) else ""
    rows: list[dict[str, Any]] = []
    seen: dict[str, tuple[str, int]] = {}
    for number, record in jsonl_records(text, str(manifest), noun="row"):
        where = f"{manifest}:{number}"
        audio = record.get("audio")
        if not isinstance(audio, str) or not audio.strip():
            raise ValueError(f"{where}: row has no 'audio' (the recording's path or URL)")
        group = record.get("melody_group")
        if group is None or not str(group).strip() or isinstance(group, (dict, list, bool)):
            raise ValueError(f"{where}: row has an empty or missing 'melody_group' (rows sharing one share a melody)")
        uri = _resolve(audio.strip(), base)
        key = stem(uri)
        if key in seen and seen[key][0] != uri:
            raise ValueError(f"{where}: {uri} has the same file stem {key!r} as line {seen[key][1]} "
                             f"({seen[key][0]}); clips are matched by stem, rename one")
        seen[key] = (uri, number)
        rows.append({"audio": uri, "melody_group": str(group).strip(), "caption": str(record.get("caption") or "")})
    if not rows:
        raise ValueError(f"{manifest}: the pairs manifest has no rows")
    return rows


def check_melody_groups(rows: list[dict[str, Any]], min_recordings: int = 2, strict: bool = False) -> dict[str, Any]:
    """Group sizes of pairs rows: a triplet needs two recordings of a melody (anchor and positive) and one
    of another (negative). Reports the groups with fewer than ``min_recordings`` (``strict``: ValueError)."""
    sizes: dict[str, int] = {}
    for row in rows:
        sizes[row["melody_group"]] = sizes.get(row["melody_group"], 0) + 1
    short = sorted(g for g, size in sizes.items() if size < min_recordings)
    usable = [g for g, size in sizes.items() if size >= min_recordings]
    report = {
        "groups": len(sizes),
        "recordings": len(rows),
        "usable_groups": len(usable),
        "short_groups": short,
        "ok": not short and len(usable) >= 2,
    }
    if strict and not report["ok"]:
        problems = []
        if short:
            shown = ", ".join(short[:10]) + (f" and {len(short) - 10} more" if len(short) > 10 else "")
            problems.append(f"{len(short)} melody group(s) with fewer than {min_recordings} recordings: {shown}")
        if len(usable) < 2:
            problems.append(f"only {len(usable)} group(s) with {min_recordings}+ recordings (negatives need 2+)")
        raise ValueError("; ".join(problems))
    return report
