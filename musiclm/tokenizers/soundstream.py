"""SoundStream (Zeghidour et al., 2021): the neural codec whose RVQ codes are MusicLM's acoustic tokens A.

24 kHz mono in, a causal convolutional encoder with total stride 480 (50 frames/s), a 12 x 1024 residual
vector quantizer (600 tokens/s, 6 kbps), and a decoder that mirrors the encoder with transposed
convolutions. The discriminators used to train it adversarially live here too (as models; the losses
are the learner's business, ``musiclm.training.soundstream_learner``).

Causality: every convolution is padded on the left only, and every transposed convolution trims its
output on the right, so output sample ``n`` depends on codes of frames ``<= n // 480`` and code frame
``f`` on input samples ``< (f + 1) * 480``. This is what makes the codec streamable: ``encode_stream`` /
``decode_stream`` keep each convolution's left context (and the input it has not consumed yet) as state
between chunks, so chunks of any size give exactly the codes and audio of one call on the whole signal.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm.checkpoint import config_from_dict, load_artifact, load_weights
from musiclm.constants import (
    ACOUSTIC_CODEBOOK_SIZE,
    ACOUSTIC_CODEBOOKS,
    ACOUSTIC_HOP,
    SAMPLE_RATE,
)
from musiclm.tokenizers.rvq import FactorizedResidualVQ, ResidualVQ, touch

PRESETS = ("tiny", "paper")
QUANTIZERS = ("ema", "factorized")

# Streaming state: per convolution, the input it still needs (left context + unconsumed samples).
StreamCache = dict[nn.Module, Tensor]


@dataclass
class SoundStreamConfig:
    """SoundStream as MusicLM uses it. Defaults are the ``paper`` preset: the SoundStream paper's
    architecture (C = 32, residual units with dilations 1, 3, 9, channels doubling at every strided
    block) with MusicLM's total stride 480 = 2 * 4 * 6 * 10 and 12 x 1024 RVQ."""

    sample_rate: int = SAMPLE_RATE
    channels: int = 32  # C: encoder input / decoder output width; block b has C * 2**(b+1) channels
    strides: tuple[int, ...] = (2, 4, 6, 10)  # product must be 480 (50 Hz frames)
    dilations: tuple[int, ...] = (1, 3, 9)  # residual units per block
    latent_dim: int = 512  # D: embedding (and codebook vector) size
    num_quantizers: int = ACOUSTIC_CODEBOOKS
    codebook_size: int = ACOUSTIC_CODEBOOK_SIZE
    # "ema": SoundStream's codebooks (EMA, k-means init, dead-code restarts, commitment loss);
    # "factorized": DAC's low-dimensional normalised codes learned by gradient
    quantizer: str = "ema"
    codebook_dim: int = 8  # factorized codes only: matched by cosine in this many dimensions
    ema_decay: float = 0.99  # EMA of codebooks (ema) / of code usage (both)
    commitment_weight: float = 1.0  # ema: commitment mse weight; factorized: weight of codebook + 0.25 commitment
    dead_code_threshold: float = 0.01  # EMA usage (vectors / step) under which a code is restarted
    quantizer_dropout: float = 1.0  # fraction of examples trained on n_q ~ U[1, 12] levels (paper: all)
    causal: bool = True
    # discriminators (SoundStream: a multi-scale waveform discriminator and an STFT discriminator)
    wave_channels: int = 16
    wave_max_channels: int = 1024
    wave_downsamples: int = 4  # grouped strided conv layers per scale (MelGAN)
    wave_scales: int = 3
    stft_channels: int = 32
    stft_n_ffts: tuple[int, ...] = (2048, 1024, 512)  # one STFT discriminator per size, hop n_fft // 4

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"unknown SoundStream quantizer '{self.quantizer}': valid are {', '.join(QUANTIZERS)}")
        if not 0.0 <= float(self.quantizer_dropout) <= 1.0:
            raise ValueError(f"quantizer_dropout is a fraction of examples in [0, 1], got {self.quantizer_dropout}")
        if math.prod(self.strides) != ACOUSTIC_HOP:
            raise ValueError(f"SoundStream strides {self.strides} multiply to {math.prod(self.strides)}, need {ACOUSTIC_HOP}")
        if self.sample_rate != SAMPLE_RATE:
            raise ValueError(f"SoundStream runs at {SAMPLE_RATE} Hz, got sample_rate={self.sample_rate}")
        if any(n < 128 for n in self.stft_n_ffts):
            raise ValueError("STFT discriminator FFT sizes must be >= 128")

    @property
    def hop_length(self) -> int:
        return math.prod(self.strides)

    @classmethod
    def preset(cls, name: str) -> SoundStreamConfig:
        if name == "paper":
            return cls()
        if name == "tiny":
            # a few CPU-minutes of training; rates and vocabulary unchanged. Factorized codes: at the demo's
            # budget (400 steps, benchmarks/bench_codec.py) they reached held-out mel distance 1.176 with
            # a level-0 code perplexity of 48, EMA codebooks 1.188 with a collapsed level 0 (perplexity 1.1)
            return cls(
                channels=8,
                dilations=(1,),  # one residual unit per block: half the CPU time of (1, 3)
                latent_dim=64,
                quantizer="factorized",
                wave_channels=4,
                wave_max_channels=64,
                wave_downsamples=2,
                wave_scales=2,
                stft_channels=4,
                stft_n_ffts=(1024,),
            )
        raise ValueError(f"unknown SoundStream preset '{name}': valid presets are {', '.join(PRESETS)}")


# ---------------------------------------------------------------------------------------- building blocks


class CausalConv1d(nn.Conv1d):
    """Conv1d padded so that output ``t`` sees inputs ``<= t * stride + stride - 1`` only (``causal``), or
    padded symmetrically. Either way a length divisible by the stride shrinks exactly by the stride.

    With a ``cache`` (streaming, causal only) the left padding is replaced by the input this layer kept
    from the previous chunk: a chunk of any length gives the outputs it completes, and the samples not
    yet consumed wait in the cache for the next chunk."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, dilation: int = 1, causal: bool = True):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, dilation=dilation)
        total = (kernel_size - 1) * dilation + 1 - stride
        self.causal = causal
        self.pad = (total, 0) if causal else (total // 2, total - total // 2)

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        if cache is None:
            return super().forward(F.pad(x, self.pad))
        if not self.causal:
            raise ValueError("only a causal SoundStream can stream")
        past = cache.get(self)
        if past is None:  # the start of the stream: the zeros of the whole-signal padding
            past = x.new_zeros(x.shape[0], x.shape[1], self.pad[0])
        full = torch.cat([past, x], dim=-1)  # [B, C, kept + T]
        span = (self.kernel_size[0] - 1) * self.dilation[0] + 1
        stride = self.stride[0]
        outputs = (full.shape[-1] - span) // stride + 1 if full.shape[-1] >= span else 0
        cache[self] = full[..., outputs * stride :]
        if outputs == 0:
            return x.new_zeros(x.shape[0], self.out_channels, 0)
        return super().forward(full[..., : (outputs - 1) * stride + span])  # [B, C_out, outputs]


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """Transposed conv (kernel 2S, stride S) trimmed to exactly ``S`` times its input length; trimming
    only on the right keeps output sample ``n`` dependent on input frames ``<= n // S``.

    Streaming (a ``cache``): output block ``j`` also needs input frame ``j - 1``, so the last frame of
    each chunk is kept (zeros before the first chunk, which contribute nothing, as in one call)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, causal: bool = True):
        super().__init__(in_ch, out_ch, kernel_size=2 * stride, stride=stride)
        self.stride_ = stride
        self.causal = causal

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        length = x.shape[-1] * self.stride_
        if cache is None:
            y = super().forward(x)  # [B, C, (L + 1) * S]
            start = 0 if self.causal else self.stride_ // 2
            return y[..., start : start + length]  # [B, C, L * S]
        if not self.causal:
            raise ValueError("only a causal SoundStream can stream")
        if x.shape[-1] == 0:
            return x.new_zeros(x.shape[0], self.out_channels, 0)
        past = cache.get(self)
        if past is None:
            past = x.new_zeros(x.shape[0], x.shape[1], 1)
        cache[self] = x[..., -1:]
        y = super().forward(torch.cat([past, x], dim=-1))  # [B, C, (L + 2) * S]
        return y[..., self.stride_ : self.stride_ + length]  # [B, C, L * S]: the blocks of this chunk's frames


class ResidualUnit(nn.Module):
    """``x + Conv1x1(ELU(Conv7_dilated(ELU(x))))``: the dilations 1, 3, 9 widen the receptive field."""

    def __init__(self, channels: int, dilation: int, causal: bool = True):
        super().__init__()
        self.conv = CausalConv1d(channels, channels, 7, dilation=dilation, causal=causal)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        if x.shape[-1] == 0:  # a streamed chunk that completed no frame of this layer
            return x
        return x + self.proj(F.elu(self.conv(F.elu(x), cache)))


class EncoderBlock(nn.Module):
    """Residual units at ``in_ch`` then a strided conv (kernel 2S) that doubles the channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dilations: tuple[int, ...], causal: bool = True):
        super().__init__()
        self.units = nn.ModuleList(ResidualUnit(in_ch, d, causal) for d in dilations)
        self.down = CausalConv1d(in_ch, out_ch, 2 * stride, stride=stride, causal=causal)

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        for unit in self.units:
            x = unit(x, cache)
        return self.down(F.elu(x), cache)  # [B, out_ch, T / S]


class DecoderBlock(nn.Module):
    """The mirror of ``EncoderBlock``: a transposed conv that upsamples by S and halves the channels,
    then residual units."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dilations: tuple[int, ...], causal: bool = True):
        super().__init__()
        self.up = CausalConvTranspose1d(in_ch, out_ch, stride, causal=causal)
        self.units = nn.ModuleList(ResidualUnit(out_ch, d, causal) for d in dilations)

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        x = self.up(F.elu(x), cache)  # [B, out_ch, T * S]
        for unit in self.units:
            x = unit(x, cache)
        return x


class Encoder(nn.Module):
    """``wav[B, 1, T] -> z[B, D, T / 480]``."""

    def __init__(self, config: SoundStreamConfig):
        super().__init__()
        c, causal = config.channels, config.causal
        widths = [c * 2**i for i in range(len(config.strides) + 1)]  # C, 2C, 4C, 8C, 16C
        self.stem = CausalConv1d(1, c, 7, causal=causal)
        self.blocks = nn.ModuleList(
            EncoderBlock(widths[i], widths[i + 1], s, config.dilations, causal) for i, s in enumerate(config.strides)
        )
        self.out = CausalConv1d(widths[-1], config.latent_dim, 3, causal=causal)

    def forward(self, wav: Tensor, cache: StreamCache | None = None) -> Tensor:
        x = self.stem(wav, cache)
        for block in self.blocks:
            x = block(x, cache)
        return self.out(F.elu(x), cache)


class Decoder(nn.Module):
    """``z[B, D, F] -> wav[B, 1, F * 480]``."""

    def __init__(self, config: SoundStreamConfig):
        super().__init__()
        c, causal = config.channels, config.causal
        widths = [c * 2**i for i in range(len(config.strides), -1, -1)]  # 16C, 8C, 4C, 2C, C
        self.stem = CausalConv1d(config.latent_dim, widths[0], 7, causal=causal)
        self.blocks = nn.ModuleList(
            DecoderBlock(widths[i], widths[i + 1], s, config.dilations, causal)
            for i, s in enumerate(reversed(config.strides))
        )
        self.out = CausalConv1d(c, 1, 7, causal=causal)

    def forward(self, z: Tensor, cache: StreamCache | None = None) -> Tensor:
        x = self.stem(z, cache)
        for block in self.blocks:
            x = block(x, cache)
        return self.out(F.elu(x), cache)


# ---------------------------------------------------------------------------------------- the codec


class SoundStream(nn.Module):
    """Encoder -> residual VQ -> decoder. ``encode``/``decode`` are the acoustic tokenizer interface;
    ``encode_stream``/``decode_stream`` the same, chunk by chunk."""

    def __init__(self, config: SoundStreamConfig):
        super().__init__()
        self.config = config
        self.sample_rate = config.sample_rate
        self.hop_length = config.hop_length
        self.frame_rate = config.sample_rate // config.hop_length
        self.num_codebooks = config.num_quantizers
        self.codebook_size = config.codebook_size
        self.encoder = Encoder(config)
        if config.quantizer == "ema":
            self.quantizer: ResidualVQ = ResidualVQ(
                config.latent_dim,
                config.num_quantizers,
                config.codebook_size,
                decay=config.ema_decay,
                commitment_weight=config.commitment_weight,
                dead_code_threshold=config.dead_code_threshold,
                quantizer_dropout=config.quantizer_dropout,
            )
        else:
            self.quantizer = FactorizedResidualVQ(
                config.latent_dim,
                config.num_quantizers,
                config.codebook_size,
                code_dim=config.codebook_dim,
                commitment_weight=config.commitment_weight,
                dead_code_threshold=config.dead_code_threshold,
                quantizer_dropout=config.quantizer_dropout,
                decay=config.ema_decay,
            )
        self.decoder = Decoder(config)

    def _frames(self, wav: Tensor) -> Tensor:
        """``wav[B, T] -> [B, 1, F * 480]``: whole frames only (``F = T // 480``)."""
        if wav.ndim != 2:
            raise ValueError(f"SoundStream expects wav[B, T], got shape {tuple(wav.shape)}")
        frames = wav.shape[-1] // self.hop_length
        if frames == 0:
            raise ValueError(f"SoundStream needs at least {self.hop_length} samples, got {wav.shape[-1]}")
        return wav[:, None, : frames * self.hop_length]  # [B, 1, F * 480]

    def forward(self, wav: Tensor, quantize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """``wav[B, T] -> (recon[B, F * 480], codes[B, K, F], commit_loss)``; trains the RVQ codebooks
        in training mode (with quantizer dropout: each example its own number of levels, codes -1 above).
        ``quantize=False`` decodes the latents themselves (a plain autoencoder; codes all -1)."""
        z = self.encoder(self._frames(wav)).transpose(1, 2)  # [B, F, D]
        if quantize:
            quantized, codes, commit = self.quantizer(z)
        else:
            quantized, commit = z, touch(self.quantizer).to(z.device)
            codes = torch.full((*z.shape[:2], self.num_codebooks), -1, dtype=torch.long, device=z.device)
        recon = self.decoder(quantized.transpose(1, 2)).squeeze(1)  # [B, F * 480]
        return recon, codes.transpose(1, 2), commit  # codes [B, K, F]

    @torch.no_grad()
    def encode(self, wav: Tensor, num_quantizers: int | None = None) -> Tensor:
        """``wav[B, T] -> codes[B, K, F]`` long, ``F = T // 480`` (a trailing partial frame is dropped);
        ``K = num_quantizers`` (all 12 by default) coarsest levels."""
        z = self.encoder(self._frames(wav)).transpose(1, 2)  # [B, F, D]
        return self.quantizer.encode(z, num_quantizers).transpose(1, 2)  # [B, K, F]

    def decode(self, codes: Tensor) -> Tensor:
        """``codes[B, K', F] -> wav[B, F * 480]``; ``K' < K`` decodes the first ``K'`` levels only."""
        if codes.ndim == 3 and codes.shape[-1] == 0:
            raise ValueError("SoundStream.decode got codes of 0 frames: nothing to decode")
        return self._decode(codes)

    def _decode(self, codes: Tensor, cache: StreamCache | None = None) -> Tensor:
        if codes.ndim != 3:
            raise ValueError(f"SoundStream.decode expects codes[B, K, F], got shape {tuple(codes.shape)}")
        if not 1 <= codes.shape[1] <= self.num_codebooks:
            raise ValueError(f"SoundStream.decode takes 1..{self.num_codebooks} levels, got {codes.shape[1]}")
        z = self.quantizer.decode(codes.long().transpose(1, 2))  # [B, F, D]
        return self.decoder(z.transpose(1, 2), cache).squeeze(1)  # [B, F * 480]

    @torch.no_grad()
    def encode_stream(self, chunks: Iterable[Tensor], num_quantizers: int | None = None) -> Iterator[Tensor]:
        """Codes of a signal that arrives in chunks ``wav[B, T_i]`` of any length: yields, per chunk, the
        codes ``[B, K, f_i]`` of the frames it completes (``f_i`` may be 0). Together they are exactly
        ``encode`` of the concatenated signal. Use in eval mode (training updates the codebooks)."""
        self._check_streamable()
        cache: StreamCache = {}
        for chunk in chunks:
            if chunk.ndim != 2:
                raise ValueError(f"SoundStream.encode_stream expects chunks wav[B, T], got shape {tuple(chunk.shape)}")
            z = self.encoder(chunk[:, None], cache).transpose(1, 2)  # [B, f_i, D]
            yield self.quantizer.encode(z, num_quantizers).transpose(1, 2)  # [B, K, f_i]

    @torch.no_grad()
    def decode_stream(self, code_chunks: Iterable[Tensor]) -> Iterator[Tensor]:
        """Audio of codes that arrive in chunks ``[B, K', f_i]``: yields ``wav[B, f_i * 480]`` per chunk,
        together exactly ``decode`` of the concatenated codes."""
        self._check_streamable()
        cache: StreamCache = {}
        for codes in code_chunks:
            yield self._decode(codes, cache)

    def _check_streamable(self) -> None:
        if not self.config.causal:
            raise ValueError("only a causal SoundStream (config.causal=True) can stream")


def load_soundstream(path: str | os.PathLike, preset: str | None = None) -> SoundStream:
    """The trained codec of an artifact folder (kind ``soundstream``), in eval mode."""
    document, state = load_artifact(path, kind="soundstream", preset=preset)
    config = dict(document["config"])
    if "quantizer" not in config:  # written before the choice existed: factorized codes only
        config["quantizer"] = "factorized"
    model = SoundStream(config_from_dict(SoundStreamConfig, config))
    load_weights(model, state, path)
    return model.eval()


# ---------------------------------------------------------------------------------------- discriminators

Features = list[Tensor]


class WaveScaleDiscriminator(nn.Module):
    """MelGAN's waveform discriminator at one scale: grouped strided 1-D convolutions."""

    def __init__(self, channels: int, max_channels: int, downsamples: int):
        super().__init__()
        layers = [nn.Conv1d(1, channels, 15, padding=7)]
        ch = channels
        for _ in range(downsamples):
            out = min(ch * 4, max_channels)
            layers.append(nn.Conv1d(ch, out, 41, stride=4, padding=20, groups=max(1, ch // 4)))
            ch = out
        layers.append(nn.Conv1d(ch, ch, 5, padding=2))
        self.layers = nn.ModuleList(layers)
        self.logits = nn.Conv1d(ch, 1, 3, padding=1)

    def forward(self, wav: Tensor) -> tuple[Tensor, Features]:
        x, features = wav, []  # [B, 1, T]
        for layer in self.layers:
            x = F.leaky_relu(layer(x), 0.2)
            features.append(x)
        return self.logits(x), features  # logits [B, 1, T']


class WaveDiscriminator(nn.Module):
    """Multi-scale waveform discriminator: the same architecture on the waveform downsampled by 1, 2, 4."""

    def __init__(self, channels: int = 16, max_channels: int = 1024, downsamples: int = 4, scales: int = 3):
        super().__init__()
        self.scales = nn.ModuleList(WaveScaleDiscriminator(channels, max_channels, downsamples) for _ in range(scales))

    def forward(self, wav: Tensor) -> list[tuple[Tensor, Features]]:
        x = wav[:, None, :]  # [B, 1, T]
        outputs = []
        for i, disc in enumerate(self.scales):
            if i > 0:
                x = F.avg_pool1d(x, 4, stride=2, padding=1, count_include_pad=False)  # [B, 1, T / 2]
            outputs.append(disc(x))
        return outputs


class STFTResidualBlock(nn.Module):
    """3x3 conv then a (s_t + 2) x (s_f + 2) conv with stride (s_t, s_f), plus a strided 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: tuple[int, int]):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(in_ch, out_ch, (stride[0] + 2, stride[1] + 2), stride=stride, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(F.leaky_relu(self.conv1(F.leaky_relu(x, 0.2)), 0.2))
        s = self.skip(x)[..., : y.shape[-2], : y.shape[-1]]
        return y + s


class STFTDiscriminator(nn.Module):
    """SoundStream's STFT discriminator: real and imaginary parts of the complex STFT as two channels of
    a [time, frequency] image, six residual blocks that halve frequency (and every other one time), and
    a final conv across all remaining frequency bins."""

    STRIDES = ((1, 2), (2, 2), (1, 2), (2, 2), (1, 2), (2, 2))
    WIDTHS = (2, 2, 4, 4, 8, 8)  # channel multipliers of C

    def __init__(self, channels: int = 32, n_fft: int = 1024, hop_length: int | None = None):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length or n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.stem = nn.Conv2d(2, channels, 7, padding=3)
        blocks, ch, freq = [], channels, n_fft // 2 + 1
        for stride, mult in zip(self.STRIDES, self.WIDTHS):
            blocks.append(STFTResidualBlock(ch, channels * mult, stride))
            ch, freq = channels * mult, freq // stride[1]
        self.blocks = nn.ModuleList(blocks)
        self.logits = nn.Conv2d(ch, 1, (1, freq))

    def forward(self, wav: Tensor) -> tuple[Tensor, Features]:
        spec = torch.stft(wav, self.n_fft, self.hop_length, window=self.window, return_complex=True)  # [B, Fq, T']
        x = torch.view_as_real(spec).permute(0, 3, 2, 1)  # [B, 2, T', Fq]
        x = self.stem(x)
        features = [x]
        for block in self.blocks:
            x = block(x)
            features.append(x)
        logits = self.logits(F.leaky_relu(x, 0.2))  # [B, 1, T'', 1]
        return logits.flatten(1), features  # [B, T'']


class MultiResolutionSTFTDiscriminator(nn.Module):
    """STFT discriminators at several FFT sizes (hop n_fft / 4), each seeing a different time-frequency
    trade-off."""

    def __init__(self, channels: int = 32, n_ffts: tuple[int, ...] = (2048, 1024, 512)):
        super().__init__()
        self.discriminators = nn.ModuleList(STFTDiscriminator(channels, n) for n in n_ffts)

    def forward(self, wav: Tensor) -> list[tuple[Tensor, Features]]:
        return [d(wav) for d in self.discriminators]


class SoundStreamDiscriminator(nn.Module):
    """All the discriminators of a config: ``wav[B, T] -> [(logits, feature maps)]`` per sub-discriminator."""

    def __init__(self, config: SoundStreamConfig):
        super().__init__()
        self.wave = WaveDiscriminator(config.wave_channels, config.wave_max_channels, config.wave_downsamples, config.wave_scales)
        self.stft = MultiResolutionSTFTDiscriminator(config.stft_channels, config.stft_n_ffts)

    def forward(self, wav: Tensor) -> list[tuple[Tensor, Features]]:
        return self.wave(wav) + self.stft(wav)
