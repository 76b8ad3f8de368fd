import dataclasses

import pytest
import torch

from musiclm.checkpoint import CheckpointError, save_artifact
from musiclm.tokenizers.soundstream import (
    CausalConv1d,
    CausalConvTranspose1d,
    MultiResolutionSTFTDiscriminator,
    SoundStream,
    SoundStreamConfig,
    SoundStreamDiscriminator,
    STFTDiscriminator,
    WaveDiscriminator,
    load_soundstream,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = SoundStream(SoundStreamConfig.preset("tiny"))
    model.train()
    model(0.1 * torch.randn(2, 4800))  # a training batch: running statistics of the code-space norm
    return model.eval()


def test_presets():
    paper = SoundStreamConfig.preset("paper")
    assert paper.channels == 32 and paper.strides == (2, 4, 6, 10) and paper.dilations == (1, 3, 9)
    assert (paper.num_quantizers, paper.codebook_size) == (12, 1024)
    tiny = SoundStreamConfig.preset("tiny")
    assert (tiny.num_quantizers, tiny.codebook_size, tiny.hop_length) == (12, 1024, 480)
    with pytest.raises(ValueError, match="tiny, paper"):
        SoundStreamConfig.preset("huge")
    with pytest.raises(ValueError, match="480"):
        SoundStreamConfig(strides=(2, 4, 5, 8))


def test_shapes_one_second(tiny):
    wav = 0.1 * torch.randn(2, 24000)
    codes = tiny.encode(wav)
    assert codes.shape == (2, 12, 50) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 1024
    out = tiny.decode(codes)
    assert out.shape == (2, 24000)
    assert (tiny.sample_rate, tiny.frame_rate, tiny.num_codebooks, tiny.codebook_size) == (24000, 50, 12, 1024)
    # a trailing partial frame is dropped: F = T // 480
    assert tiny.encode(wav[:, :24000 - 1]).shape == (2, 12, 49)
    recon, fcodes, commit = tiny(wav)
    assert recon.shape == (2, 24000) and torch.equal(fcodes, codes) and commit.ndim == 0
    assert torch.allclose(recon, out, atol=1e-5)  # forward in eval == decode(encode)
    assert tiny.decode(codes[:, :4]).shape == (2, 24000)  # coarse levels only
    with pytest.raises(ValueError):
        tiny.encode(torch.randn(2, 100))
    with pytest.raises(ValueError):
        tiny.encode(torch.randn(24000))


def test_causal_layers():
    torch.manual_seed(0)
    conv = CausalConv1d(2, 3, 12, stride=6)
    up = CausalConvTranspose1d(3, 2, stride=6)
    x = torch.randn(1, 2, 60)
    assert conv(x).shape == (1, 3, 10) and up(conv(x)).shape == (1, 2, 60)
    y = x.clone()
    y[..., 30:] += 1.0
    assert torch.equal(conv(x)[..., :5], conv(y)[..., :5]) and not torch.equal(conv(x), conv(y))
    assert torch.equal(up(conv(x))[..., :30], up(conv(y))[..., :30])


def test_causality_of_codes_and_output(tiny):
    torch.manual_seed(1)
    wav = 0.1 * torch.randn(1, 24000)
    changed = wav.clone()
    cut = 20 * 480
    changed[:, cut:] = 0.1 * torch.randn(1, 24000 - cut)
    a, b = tiny.encode(wav), tiny.encode(changed)
    assert torch.equal(a[..., :20], b[..., :20])  # frames before the change are untouched
    assert not torch.equal(a[..., 20:], b[..., 20:])
    ya, yb = tiny.decode(a), tiny.decode(b)
    assert torch.equal(ya[:, :cut], yb[:, :cut])  # output sample n depends on frames <= n // 480 only
    assert not torch.equal(ya[:, cut:], yb[:, cut:])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = SoundStream(SoundStreamConfig.preset("tiny")).train()
    wav = 0.1 * torch.randn(2, 4800)
    recon, codes, commit = model(wav)
    assert codes.shape == (2, 12, 10)
    ((recon - wav).abs().mean() + commit).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_discriminators_return_logits_and_features():
    config = SoundStreamConfig.preset("tiny")
    wav = (0.1 * torch.randn(3, 4800)).requires_grad_()
    outputs = SoundStreamDiscriminator(config)(wav)
    assert len(outputs) == config.wave_scales + len(config.stft_n_ffts)
    for logits, features in outputs:
        assert logits.shape[0] == 3 and logits.numel() > 3 and len(features) >= 3
        assert all(f.shape[0] == 3 for f in features)
    sum(lg.sum() for lg, _ in outputs).backward()
    assert wav.grad is not None and wav.grad.abs().sum() > 0
    wave = WaveDiscriminator(channels=4, max_channels=16, downsamples=2, scales=3)(wav.detach())
    assert [lg.shape[-1] for lg, _ in wave] == [300, 150, 75]  # each scale halves the rate
    logits, feats = STFTDiscriminator(channels=4, n_fft=256)(wav.detach())
    assert logits.ndim == 2 and len(feats) == 7
    assert len(MultiResolutionSTFTDiscriminator(4, (128, 256))(wav.detach())) == 2


def test_artifact_round_trip(tmp_path, tiny):
    save_artifact(tmp_path, kind="soundstream", preset="tiny", config=tiny.config, state_dict=tiny.state_dict())
    loaded = load_soundstream(tmp_path)
    assert not loaded.training
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(tiny.config)
    wav = 0.1 * torch.randn(1, 4800)
    assert torch.equal(loaded.encode(wav), tiny.encode(wav))
    assert torch.allclose(loaded.decode(tiny.encode(wav)), tiny.decode(tiny.encode(wav)))
    with pytest.raises(CheckpointError):
        load_soundstream(tmp_path, preset="paper")
