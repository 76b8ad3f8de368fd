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
    assert paper.quantizer == "ema" and paper.quantizer_dropout == 1.0 and len(paper.stft_n_ffts) == 3
    with pytest.raises(ValueError, match="ema, factorized"):
        SoundStreamConfig(quantizer="gumbel")
    tiny = SoundStreamConfig.preset("tiny")
    assert (tiny.num_quantizers, tiny.codebook_size, tiny.hop_length) == (12, 1024, 480)
    assert tiny.quantizer == "factorized" and tiny.quantizer_dropout == 1.0
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
    model = SoundStream(dataclasses.replace(SoundStreamConfig.preset("tiny"), quantizer_dropout=0.0)).train()
    wav = 0.1 * torch.randn(2, 4800)
    recon, codes, commit = model(wav)
    assert codes.shape == (2, 12, 10)
    ((recon - wav).abs().mean() + commit).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # quantizer dropout / an autoencoder step: every parameter still gets a (maybe zero) gradient, as DDP needs
    dropout = SoundStream(SoundStreamConfig.preset("tiny")).train()
    for quantize in (True, False):
        dropout.zero_grad(set_to_none=True)
        recon, codes, commit = dropout(0.1 * torch.randn(1, 4800), quantize=quantize)
        (recon.abs().mean() + commit).backward()
        assert all(p.grad is not None for p in dropout.parameters())


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


def _stream(model, wav, size):
    return torch.cat(list(model.encode_stream(wav[:, i : i + size] for i in range(0, wav.shape[1], size))), dim=-1)


@pytest.mark.parametrize("quantizer", ["ema", "factorized"])
def test_streaming_encode_and_decode_equal_whole_signal(quantizer):
    # float64: chunked and whole convolutions then differ by ~1e-16, far from any nearest-code tie
    torch.manual_seed(0)
    config = dataclasses.replace(SoundStreamConfig.preset("tiny"), quantizer=quantizer)
    model = SoundStream(config).double()
    if quantizer == "ema":  # random codebooks, each level finer than the last (k-means init is slow)
        for k, layer in enumerate(model.quantizer.layers):
            layer.codebook.normal_(0.0, 0.02 * 0.7**k)
            layer.initted.fill_(True)
    else:
        model.train()(0.1 * torch.randn(2, 4800, dtype=torch.float64))  # running statistics of the code norm
    model.eval()
    wav = 0.1 * torch.randn(2, 7200 + 333, dtype=torch.float64)  # 15 frames and a partial one
    codes = model.encode(wav)
    for size in (480, 1111, 5000):  # frame-aligned, odd, several frames
        streamed = _stream(model, wav, size)
        assert torch.equal(streamed, codes), size
    # uneven chunks, some completing no frame at all
    cuts = [0, 5, 400, 1500, 1501, 7000, wav.shape[1]]
    pieces = list(model.encode_stream(wav[:, a:b] for a, b in zip(cuts, cuts[1:])))
    assert [p.shape[-1] for p in pieces] == [0, 0, 3, 0, 11, 1]
    assert torch.equal(torch.cat(pieces, dim=-1), codes)
    assert torch.equal(_stream(model, wav, 1000)[:, :4], torch.cat(list(model.encode_stream([wav], 4)), -1))

    audio = model.decode(codes)
    for frames in (1, 4):
        chunks = [codes[..., i : i + frames] for i in range(0, codes.shape[-1], frames)]
        out = list(model.decode_stream(chunks))
        assert [o.shape[-1] for o in out] == [c.shape[-1] * 480 for c in chunks]
        assert torch.allclose(torch.cat(out, dim=-1), audio, rtol=0, atol=1e-12)
    coarse = list(model.decode_stream([codes[:, :4, :6], codes[:, :4, 6:]]))
    assert torch.allclose(torch.cat(coarse, dim=-1), model.decode(codes[:, :4]), rtol=0, atol=1e-12)


def test_streaming_in_float32_and_errors(tiny):
    torch.manual_seed(3)
    wav = 0.1 * torch.randn(1, 9600)
    codes = tiny.encode(wav)
    streamed = _stream(tiny, wav, 1000)
    # float32 rounding of chunked convolutions may flip a rare near-tie between two codes
    assert (streamed == codes).float().mean() > 0.99
    chunks = [codes[..., :5], codes[..., 5:]]
    assert torch.allclose(torch.cat(list(tiny.decode_stream(chunks)), -1), tiny.decode(codes), atol=1e-5, rtol=1e-4)
    acausal = SoundStream(dataclasses.replace(SoundStreamConfig.preset("tiny"), causal=False)).eval()
    with pytest.raises(ValueError, match="causal"):
        next(acausal.encode_stream([wav]))
    with pytest.raises(ValueError):
        next(tiny.encode_stream([wav[0]]))


def test_fewer_levels_encode_and_decode(tiny):
    wav = 0.1 * torch.randn(2, 4800)
    codes = tiny.encode(wav)
    for k in (1, 4, 11):
        assert torch.equal(tiny.encode(wav, num_quantizers=k), codes[:, :k])
        out = tiny.decode(codes[:, :k])
        assert out.shape == (2, 4800) and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        tiny.encode(wav, num_quantizers=13)
    with pytest.raises(ValueError):
        tiny.decode(codes[:, :0])


def test_decoding_zero_frames_is_a_clear_error():
    model = SoundStream(SoundStreamConfig.preset("tiny")).eval()
    with pytest.raises(ValueError, match="0 frames"):
        model.decode(torch.zeros(1, 12, 0, dtype=torch.long))
