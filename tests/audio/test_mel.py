"""Shapes, rates and known answers of musiclm.audio.mel."""

import numpy as np
import pytest
import torch

from musiclm.audio import MelSpectrogram, hz_to_mel, mel_filterbank, mel_to_hz

torch.set_num_threads(1)


def test_slaney_and_htk_scales_known_answers():
    assert float(hz_to_mel(1000.0)) == pytest.approx(15.0)  # Slaney: linear up to 1 kHz
    assert float(hz_to_mel(200.0)) == pytest.approx(3.0)
    assert float(hz_to_mel(6400.0)) == pytest.approx(42.0)  # 15 + 27 mel per factor 6.4
    assert float(hz_to_mel(1000.0, htk=True)) == pytest.approx(1000.0, abs=0.1)
    freqs = np.array([0.0, 440.0, 3000.0, 11000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(freqs)), freqs, atol=1e-6)
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(freqs, htk=True), htk=True), freqs, atol=1e-6)


def test_filterbank_shape_and_coverage():
    fb = mel_filterbank(24000, 1024, 64)
    assert fb.shape == (64, 513) and (fb >= 0).all()
    assert (fb.max(axis=1) > 0).all()  # no empty filter
    peaks = fb.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all()  # filters ordered by frequency
    with pytest.raises(ValueError):
        mel_filterbank(24000, 1024, 64, f_min=100.0, f_max=20000.0)


@pytest.mark.parametrize("hop,rate", [(240, 100), (960, 25)])
@pytest.mark.parametrize("length", [24000, 24000 + 239, 2 * 24000 + 500])
def test_frames_are_exactly_t_over_hop(hop, rate, length):
    mel = MelSpectrogram(sample_rate=24000, hop_length=hop, n_mels=64)
    out = mel(torch.randn(2, length))
    assert out.shape == (2, 64, length // hop)
    assert mel.frame_rate == rate
    assert torch.isfinite(out).all()


def test_short_inputs():
    mel = MelSpectrogram()
    assert mel(torch.randn(1, 100)).shape == (1, 64, 0)
    assert mel(torch.randn(1, 300)).shape == (1, 64, 1)  # shorter than n_fft // 2: zero padding
    assert mel(torch.randn(3, 2, 480)).shape == (3, 2, 64, 2)  # leading dims kept


def test_sine_lights_up_the_right_band():
    sr, f0 = 24000, 1000.0
    t = torch.arange(sr) / sr
    out = MelSpectrogram(n_mels=64)(torch.sin(2 * torch.pi * f0 * t)[None])  # [1, 64, 100]
    band = int(out[0].mean(dim=1).argmax())
    centres = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(12000.0), 66))[1:-1]
    assert abs(centres[band] - f0) < 150.0
    silent = MelSpectrogram()(torch.zeros(1, sr))
    torch.testing.assert_close(silent, torch.full_like(silent, float(np.log(1e-5))))


def test_deterministic_gradient_and_no_state():
    mel = MelSpectrogram(hop_length=240)
    x = torch.randn(2, 4800, requires_grad=True)
    a, b = mel(x), mel(x)
    torch.testing.assert_close(a, b)
    a.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert list(mel.state_dict()) == []  # rebuilt from arguments, never stored in checkpoints
    mel64 = mel.to(torch.float64)
    assert mel64(x.detach().double()).dtype == torch.float64
