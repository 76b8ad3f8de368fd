"""Log-mel spectrogram in pure torch (torchaudio is not a dependency), and SoundStream's multi-scale
mel reconstruction loss / codec distance built on it (the one mel implementation of the project).

MuLan's audio tower and the melody embedder read log-mel frames (paper §3.1 / appendix C). The
frame rate must line up exactly with the token rates — with the defaults (24 kHz, hop 240) that is
100 frames/s, i.e. 4 mel frames per 25-Hz semantic token and 2 per 50-Hz acoustic frame — so the
output has ``F = T // hop_length`` frames exactly: the extra frame that a centred STFT produces is
dropped.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from musiclm.constants import SAMPLE_RATE

__all__ = ["MelSpectrogram", "MultiScaleMel", "hz_to_mel", "mel_filterbank", "mel_to_hz"]

# Slaney's Auditory Toolbox mel scale: linear below 1 kHz, logarithmic above (librosa's default).
_F_SP = 200.0 / 3  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15 mel
_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray | float, htk: bool = False) -> np.ndarray:
    """Frequency in Hz to mel (Slaney scale by default, HTK's ``2595 log10(1 + f/700)`` if ``htk``)."""
    hz = np.asarray(hz, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    linear = hz / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
    return np.where(hz >= _MIN_LOG_HZ, log, linear)


def mel_to_hz(mel: np.ndarray | float, htk: bool = False) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    linear = mel * _F_SP
    log = _MIN_LOG_HZ * np.exp(_LOG_STEP * (mel - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log, linear)


def mel_filterbank(
    sample_rate: int,
    n_fft: int,
    n_mels: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    htk: bool = False,
    norm: str | None = "slaney",
) -> np.ndarray:
    """Triangular mel filters ``[n_mels, n_fft // 2 + 1]``, with Slaney area normalisation by default.

    Each filter spans three consecutive points equally spaced on the mel scale; ``norm="slaney"``
    scales it by ``2 / bandwidth`` so that wide high-frequency bands do not dominate the low ones
    (``norm=None``: peak 1, HTK / torchaudio's default).
    """
    if norm not in ("slaney", None):
        raise ValueError(f"mel filterbank norm must be 'slaney' or None, got {norm!r}")
    f_max = sample_rate / 2.0 if f_max is None else float(f_max)
    if not 0.0 <= f_min < f_max <= sample_rate / 2.0:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={f_min}, f_max={f_max}")
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)  # [n_freqs]
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min, htk), hz_to_mel(f_max, htk), n_mels + 2), htk)  # [n_mels + 2]
    widths = np.diff(edges)  # [n_mels + 1]
    ramps = edges[:, None] - fft_freqs[None, :]  # [n_mels + 2, n_freqs]
    lower = -ramps[:-2] / widths[:-1, None]  # rising edge   [n_mels, n_freqs]
    upper = ramps[2:] / widths[1:, None]  # falling edge  [n_mels, n_freqs]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if norm == "slaney":
        weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


class MelSpectrogram(nn.Module):
    """``wav[B, T] -> log(mel power + 1e-5) [B, n_mels, T // hop_length]``.

    Hann-windowed centred STFT (reflect padding, zero padding for clips shorter than half a
    window), power spectrum (``power=1``: magnitude), mel filterbank, log (unless ``log=False``). The window and filterbank are non-persistent
    buffers: they follow ``.to(device)`` but are rebuilt from the constructor arguments rather than
    stored in checkpoints. Differentiable with respect to the input.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = 1024,
        hop_length: int = 240,
        n_mels: int = 64,
        f_min: float = 0.0,
        f_max: float | None = None,
        log: bool = True,
        htk: bool = False,
        power: float = 2.0,
        norm: str | None = "slaney",
    ) -> None:
        super().__init__()
        if hop_length <= 0 or n_fft <= 0 or n_mels <= 0:
            raise ValueError("n_fft, hop_length and n_mels must be positive")
        if power not in (1.0, 2.0):
            raise ValueError(f"power must be 1 (magnitude) or 2 (power), got {power}")
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = sample_rate, n_fft, hop_length, n_mels
        self.log, self.power = log, float(power)
        self.frame_rate = sample_rate / hop_length
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        fbank = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max, htk, norm)
        self.register_buffer("fbank", torch.from_numpy(fbank), persistent=False)  # [n_mels, n_freqs]

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() < 1:
            raise ValueError("expected a waveform [..., T]")
        lead, length = wav.shape[:-1], wav.shape[-1]
        frames = length // self.hop_length
        x = wav.reshape(-1, length)  # [..., T] -> [B, T]
        if frames == 0:
            return x.new_zeros(*lead, self.n_mels, 0)
        pad_mode = "reflect" if length > self.n_fft // 2 else "constant"
        spec = torch.stft(
            x,
            self.n_fft,
            hop_length=self.hop_length,
            window=self.window.to(x.dtype),
            center=True,
            pad_mode=pad_mode,
            return_complex=True,
        )  # [B, n_freqs, 1 + T // hop]
        spec = spec[..., :frames]  # drop the extra centred frame: F = T // hop exactly
        power = spec.real.square() + spec.imag.square()  # [B, n_freqs, F]
        if self.power == 1.0:
            # sqrt has an infinite derivative at 0 (digital silence): the floor keeps gradients finite
            power = (power + 1e-12).sqrt()
        mel = torch.matmul(self.fbank.to(power.dtype), power)  # [n_mels, n_freqs] @ [B, n_freqs, F] -> [B, n_mels, F]
        if self.log:
            mel = torch.log(mel + 1e-5)
        return mel.reshape(*lead, self.n_mels, frames)  # [B, n_mels, F] -> [..., n_mels, F]


class MultiScaleMel(nn.Module):
    """Mel magnitude spectrograms at window lengths ``s`` in 2^6 .. 2^11 with hop ``s / 4`` (SoundStream,
    Zeghidour et al. 2021, §3.4): the codec's reconstruction loss and its evaluation distance.

    ``loss`` is the paper's multi-scale spectral reconstruction loss
    ``sum_s mean_t ( |S_t^s(x) - S_t^s(x̂)|_1 + alpha_s |log S_t^s(x) - log S_t^s(x̂)|_2 )``,
    ``alpha_s = sqrt(s / 2)`` (norms over mel bins; the mean over frames instead of the paper's sum keeps
    the balance with the other loss terms independent of the crop length). ``distance`` is the mean
    absolute log-mel difference over bins, frames and scales, per clip (DAC/EnCodec's "mel distance").

    Every scale has 64 mel bins where it can; a 2^6-sample window has only 33 frequency bins, so small
    windows get ``s / 4`` mel bins (16, 32) rather than mostly empty filters.
    """

    def __init__(
        self,
        scales: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048),
        n_mels: int = 64,
        sample_rate: int = SAMPLE_RATE,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not scales:
            raise ValueError("MultiScaleMel needs at least one window length")
        self.scales = tuple(int(s) for s in scales)
        self.eps = eps
        self.mels = nn.ModuleList(
            MelSpectrogram(
                sample_rate, n_fft=s, hop_length=s // 4, n_mels=min(n_mels, s // 4), log=False, power=1.0, norm=None
            )
            for s in self.scales
        )

    def spectrograms(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """``wav[B, T] -> [mel magnitude [B, n_mels_s, T // (s / 4)]]`` one per scale."""
        return [mel(wav) for mel in self.mels]

    def _pairs(self, target: torch.Tensor, estimate: torch.Tensor):
        if target.shape != estimate.shape:
            raise ValueError(f"target {tuple(target.shape)} and estimate {tuple(estimate.shape)} differ in shape")
        # one STFT pass for both signals
        for s, spec in zip(self.scales, self.spectrograms(torch.cat([target, estimate]))):
            yield s, spec[: target.shape[0]], spec[target.shape[0] :]

    def loss(self, target: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
        """The reconstruction loss (scalar), differentiable with respect to ``estimate``."""
        total = target.new_zeros(())
        for s, m_t, m_e in self._pairs(target, estimate):  # [B, n_mels, F]
            linear = (m_t - m_e).abs().sum(dim=-2).mean()  # L1 over bins, mean over frames
            log_diff = torch.log(m_t + self.eps) - torch.log(m_e + self.eps)
            total = total + linear + (s / 2) ** 0.5 * torch.linalg.vector_norm(log_diff, dim=-2).mean()
        return total

    def distance(self, target: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
        """Mean absolute log-mel difference per row of ``[B, T]`` -> ``[B]`` (0 for identical audio)."""
        rows = [
            (torch.log(m_t + self.eps) - torch.log(m_e + self.eps)).abs().mean(dim=(-2, -1))
            for _, m_t, m_e in self._pairs(target, estimate)
        ]
        return torch.stack(rows).mean(dim=0)

    def forward(self, target: torch.Tensor, estimate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, mean distance)`` in one pass over the spectrograms."""
        total, dist = target.new_zeros(()), target.new_zeros(())
        for s, m_t, m_e in self._pairs(target, estimate):
            log_diff = torch.log(m_t + self.eps) - torch.log(m_e + self.eps)  # [B, n_mels, F]
            total = total + (m_t - m_e).abs().sum(dim=-2).mean()
            total = total + (s / 2) ** 0.5 * torch.linalg.vector_norm(log_diff, dim=-2).mean()
            dist = dist + log_diff.abs().mean()
        return total, dist / len(self.scales)
