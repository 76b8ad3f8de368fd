"""Is a long piece continuous where its windows join? Two measurements on the waveform.

* :func:`spectral_flux_at_joins`: a click or a jump in timbre at a join is a burst of spectral flux
  (the rise of the log-magnitude spectrum from one short frame to the next). The peak flux near each
  join is compared with the same statistic (peak over an equally wide neighbourhood) everywhere else:
  a ratio near 1 means the joins look like any other moment of the music; a click makes it large.
* :func:`tempo_bpm`: the tempo of a stretch of audio from the autocorrelation of its onset envelope
  (the same flux, summed over frequency), weighted by a broad log-normal prior around 120 bpm to pick
  between a beat and its double or half. Measuring it on each side of a story boundary says whether
  the transition kept the tempo.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from musiclm.constants import SAMPLE_RATE

FLUX_HOP_SECONDS = 0.005  # 5-ms frames: a click is resolved, a beat's lag to ~1 %
FLUX_WINDOW_SECONDS = 0.02  # 20-ms analysis window
JOIN_TOLERANCE_SECONDS = 0.03  # a join's neighbourhood (window edges are exact, the flux frame is not)


def _as_wave(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    x = np.asarray(wav, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a mono waveform [T], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("waveform has non-finite samples")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    return x


def spectral_flux(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, float]:
    """Half-wave rectified rise of the log-magnitude spectrum per frame -> (flux [F], frame rate in Hz).

    Frame t describes the change between windows centred at samples (t - 1) hop and t hop.
    """
    x = _as_wave(wav, sample_rate)
    hop = max(1, int(round(FLUX_HOP_SECONDS * sample_rate)))
    n_fft = max(2, int(round(FLUX_WINDOW_SECONDS * sample_rate)))
    if len(x) < n_fft + hop:
        raise ValueError(f"audio of {len(x)} samples is too short to measure ({n_fft + hop} at least)")
    padded = np.pad(x, (n_fft // 2, n_fft // 2))
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]  # [F, n_fft]
    spec = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=-1))  # [F, n_fft / 2 + 1]
    log_mag = np.log1p(100.0 * spec / (np.abs(x).max() + 1e-9))  # loudness-normalised compression
    rise = np.maximum(np.diff(log_mag, axis=0), 0.0).sum(axis=-1)  # [F - 1]
    return np.concatenate([[0.0], rise]), sample_rate / hop


def _neighbourhood_max(x: np.ndarray, radius: int) -> np.ndarray:
    """max of x over [t - radius, t + radius] for every t."""
    padded = np.pad(x, (radius, radius), constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1).max(axis=-1)


def spectral_flux_at_joins(
    wav: np.ndarray, join_seconds: Sequence[float], sample_rate: int = SAMPLE_RATE
) -> dict[str, float]:
    """``{"joins": mean peak flux near the joins, "elsewhere": the same away from them, "ratio": joins /
    elsewhere}``; the peak is taken over +-30 ms, "elsewhere" excludes the neighbourhoods of the joins
    and of the ends (the first and last window of the analysis see padding)."""
    flux, rate = spectral_flux(wav, sample_rate)
    radius = max(1, int(round(JOIN_TOLERANCE_SECONDS * rate)))
    peaks = _neighbourhood_max(flux, radius)  # [F]
    duration = len(np.asarray(wav)) / sample_rate
    joins = [float(j) for j in join_seconds]
    if not joins:
        raise ValueError("no join to measure")
    if any(not 0 < j < duration for j in joins):
        raise ValueError(f"join times must lie inside the audio (0, {duration:g}) s, got {joins}")
    at = np.array([int(round(j * rate)) for j in joins])
    away = np.ones(len(flux), dtype=bool)
    away[: 2 * radius + 1] = away[len(flux) - 2 * radius - 1 :] = False
    for t in at:
        away[max(0, t - 2 * radius) : t + 2 * radius + 1] = False
    if not away.any():
        raise ValueError("the joins cover the whole audio: nothing to compare them with")
    at_joins, elsewhere = float(peaks[at].mean()), float(peaks[away].mean())
    return {"joins": at_joins, "elsewhere": elsewhere, "ratio": at_joins / max(elsewhere, 1e-12)}


def tempo_bpm(
    wav: np.ndarray, sample_rate: int = SAMPLE_RATE, min_bpm: float = 40.0, max_bpm: float = 240.0
) -> float:
    """The tempo in beats per minute: the lag in [60 / max_bpm, 60 / min_bpm] s that maximises the
    onset envelope's autocorrelation times a log-normal prior (centre 120 bpm, one octave wide),
    refined by parabolic interpolation. Needs a few beats of audio (at least two of the longest lag)."""
    if not 0 < min_bpm < max_bpm:
        raise ValueError(f"need 0 < min_bpm < max_bpm, got {min_bpm}, {max_bpm}")
    flux, rate = spectral_flux(wav, sample_rate)
    envelope = flux - flux.mean()
    lo, hi = int(np.floor(rate * 60.0 / max_bpm)), int(np.ceil(rate * 60.0 / min_bpm))
    if len(envelope) < 2 * hi:
        raise ValueError(f"audio of {len(wav) / sample_rate:.2f} s is too short for tempi down to {min_bpm:g} bpm")
    n = 1 << int(np.ceil(np.log2(2 * len(envelope))))
    spectrum = np.fft.rfft(envelope, n)
    acf = np.fft.irfft(spectrum * np.conj(spectrum), n)[: hi + 2]  # [lags]
    acf = acf / np.maximum(len(envelope) - np.arange(len(acf)), 1)  # unbiased: long lags overlap less
    lags = np.arange(lo, hi + 1)
    prior = np.exp(-0.5 * np.log2(rate * 60.0 / lags / 120.0) ** 2)
    best = int(lags[np.argmax(acf[lo : hi + 1] * prior)])
    left, mid, right = acf[best - 1], acf[best], acf[best + 1]
    curvature = left - 2 * mid + right
    shift = 0.5 * (left - right) / curvature if curvature < 0 else 0.0
    return float(60.0 * rate / (best + np.clip(shift, -0.5, 0.5)))
