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


def test_magnitude_and_unnormalised_filters():
    x = torch.randn(2, 4800)
    power = MelSpectrogram(log=False, norm=None)(x)
    magnitude = MelSpectrogram(log=False, power=1.0, norm=None)(x)
    assert (magnitude > 0).all() and magnitude.shape == power.shape
    peaks = mel_filterbank(24000, 1024, 64, norm=None).max(axis=1)  # triangles of height 1 sampled at the FFT bins
    assert (peaks <= 1.0).all() and (peaks > 0.7).all()
    with pytest.raises(ValueError):
        MelSpectrogram(power=3.0)
    with pytest.raises(ValueError):
        mel_filterbank(24000, 1024, 64, norm="area")


def test_multiscale_mel_loss_and_distance_known_answers():
    from musiclm.audio.mel import MultiScaleMel

    torch.manual_seed(0)
    mel = MultiScaleMel()
    assert mel.scales == (64, 128, 256, 512, 1024, 2048)
    assert [m.n_mels for m in mel.mels] == [16, 32, 64, 64, 64, 64]  # 2^6 has only 33 FFT bins
    x = torch.randn(2, 4800)
    assert float(mel.loss(x, x)) == 0.0 and mel.distance(x, x).abs().max() == 0.0
    # halving the amplitude shifts every log-mel bin by log 2 (the 1e-5 floor is far below these levels)
    assert torch.allclose(mel.distance(x, 0.5 * x), torch.full((2,), float(np.log(2))), rtol=1e-3)
    # one scale by hand: L1 on mel over bins + sqrt(s/2) * L2 on log-mel over bins, mean over frames
    single = MultiScaleMel(scales=(256,), n_mels=64)
    m = single.spectrograms(x)[0]  # [2, 64, F]
    expected = (0.5 * m).sum(dim=1).mean() + 128**0.5 * torch.linalg.vector_norm(
        torch.log(m + 1e-5) - torch.log(0.5 * m + 1e-5), dim=1).mean()
    assert float(single.loss(x, 0.5 * x)) == pytest.approx(float(expected), rel=1e-5)
    loss, distance = mel(x, 0.5 * x)
    assert float(loss) == pytest.approx(float(mel.loss(x, 0.5 * x)), rel=1e-5)
    assert float(distance) == pytest.approx(float(mel.distance(x, 0.5 * x).mean()), rel=1e-5)
    # finite gradients even for a silent estimate (sqrt and log at 0), useful ones for a near-silent one
    for scale in (0.0, 1e-4):
        quiet = (scale * torch.randn(2, 4800)).requires_grad_()
        mel.loss(x, quiet).backward()
        assert torch.isfinite(quiet.grad).all() and (scale == 0 or quiet.grad.abs().sum() > 0)
    with pytest.raises(ValueError):
        mel.loss(x, x[:, :480])
