"""The melody contour: the predominant pitch class of every 40-ms frame, a frame-aligned melody input.

The paper's melody tokens (appendix C) summarise 4 s of melody in one embedding; only a large model
trained on a large corpus learns to unfold them into notes, and only through semantic tokens that
carry pitch. At our scale neither holds (``benchmarks/bench_melody_path.py``): the tiny semantic tokens
carry no pitch, so the melody never reached the audio. The contour is the direct route, as
MusicGen's chromagram conditioning is: one class per semantic frame (25 Hz), 0..11 = the pitch class
(C = 0) of the loudest harmonic line, 12 = unpitched (a rest, silence), computed from the audio with
no learned model. An acoustic stage adds its embedding to the position that predicts the frame, so
the pitch of each frame is given where the frame's codes are drawn.

The pitch class comes from the harmonic-summation salience of :mod:`musiclm.evaluation.melody`
(a hum, a flute and a distorted lead give the same class), so a contour and the adherence measure
agree on what the melody is; the measure also aligns in time and key, the contour does neither.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from musiclm.constants import SAMPLE_RATE

PITCH_CLASSES = 12
UNPITCHED = PITCH_CLASSES  # a frame with no melody (far below the recording's loud frames)
CONTOUR_CLASSES = PITCH_CLASSES + 1  # the classes a contour frame takes; a stage adds NULL after them
FRAME_SECONDS = 0.04  # one class per semantic frame (25 Hz)


def melody_contour(wav: Any, frames: int | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``wav`` [T] (or an audio file path) -> contour int8 [frames]: the pitch class of each 40-ms frame
    (its 170-ms analysis window centred on the frame), ``UNPITCHED`` where it is far below the loud frames.

    ``frames`` defaults to ``round(T / 960)`` at 24 kHz (one per semantic frame of the audio).
    """
    from musiclm.evaluation.melody import VOICED_DB, _as_wave, frame_pitch_classes

    x = _as_wave(wav, sample_rate, "melody")
    hop = int(round(FRAME_SECONDS * sample_rate))
    if frames is None:
        frames = int(round(x.size / hop))
    if frames < 1:
        raise ValueError(f"a melody of {x.size / sample_rate:.3f} s has no 40-ms frame")
    classes, energy = frame_pitch_classes(x, frames, FRAME_SECONDS, sample_rate, centred=True)  # [F], [F]
    contour = classes.astype(np.int8)
    loud = np.percentile(energy, 90)
    contour[energy <= loud * 10.0 ** (-VOICED_DB / 10.0)] = UNPITCHED  # rests, silence (all of it when silent)
    return contour


def contour_slice(contour: Any, start: int, n: int) -> np.ndarray:
    """The ``n`` contour frames of a window starting at semantic frame ``start`` of the piece: a contour
    shorter than the piece repeats (tiled, like the melody tokens), int64 [..., n]."""
    c = np.asarray(contour)
    if c.ndim < 1 or c.shape[-1] == 0:
        raise ValueError(f"contour must be [..., F >= 1], got shape {c.shape}")
    index = (int(start) + np.arange(int(n))) % c.shape[-1]
    return c[..., index].astype(np.int64)
