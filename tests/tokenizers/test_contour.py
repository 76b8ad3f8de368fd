"""The melody contour: one pitch class per 40-ms frame, unpitched for rests, tiled over a long piece."""

import numpy as np
import pytest

from musiclm.tokenizers.contour import CONTOUR_CLASSES, UNPITCHED, contour_slice, melody_contour

SR = 24_000


def tone(midi: float, seconds: float, harmonics: int = 4) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    return sum(0.3 / h * np.sin(2 * np.pi * h * f0 * t) for h in range(1, harmonics + 1)).astype(np.float32)


def test_a_melody_gives_its_pitch_classes_frame_by_frame():
    notes = [60, 64, 67, 71]  # C E G B: classes 0 4 7 11, half a second each
    wav = np.concatenate([tone(m, 0.5) for m in notes])
    contour = melody_contour(wav)
    assert contour.dtype == np.int8 and contour.shape == (50,)  # 2 s at 25 Hz
    for i, midi in enumerate(notes):
        middle = contour[i * 12 + 4 : i * 12 + 8]  # away from the note changes (a frame spans 170 ms)
        assert (middle == midi % 12).all(), (i, contour)


def test_rests_are_unpitched_and_the_frame_count_can_be_set():
    wav = np.concatenate([tone(69, 1.0), np.zeros(SR, dtype=np.float32)])
    contour = melody_contour(wav, frames=60)
    assert contour.shape == (60,)
    assert (contour[:20] == 9).all()  # A
    assert (contour[30:] == UNPITCHED).all()  # the silent second, and the padding past the end
    assert (melody_contour(np.zeros(SR, dtype=np.float32)) == UNPITCHED).all()  # silence: no melody
    assert 0 <= contour.min() and contour.max() < CONTOUR_CLASSES


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="no 40-ms frame"):
        melody_contour(np.zeros(100, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        melody_contour(np.full(SR, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="mono"):
        melody_contour(np.zeros((2, SR), dtype=np.float32))


def test_slices_tile_a_contour_shorter_than_the_piece():
    contour = np.array([1, 2, 3], dtype=np.int8)
    assert contour_slice(contour, 0, 2).tolist() == [1, 2]
    assert contour_slice(contour, 2, 5).tolist() == [3, 1, 2, 3, 1]
    assert contour_slice(np.stack([contour, contour + 1]), 1, 2).tolist() == [[2, 3], [3, 4]]
    with pytest.raises(ValueError, match="F >= 1"):
        contour_slice(np.zeros(0), 0, 1)
