"""Round trips and bad-input reasons of musiclm.audio.io."""

import io
import uuid

import fsspec
import numpy as np
import pytest
import soundfile as sf

from musiclm.audio import (
    AudioError,
    AudioStream,
    audio_duration,
    decode_audio_bytes,
    encode_flac,
    encode_wav,
    load_audio,
    stream_windows,
    window_starts,
    write_wav,
)


def _sine(freq: float, seconds: float, rate: int, channels: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([mono] * channels, axis=1).astype(np.float32)  # [T, C]


def _dominant_hz(wav: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.argmax(spectrum) * rate / len(wav))


def _encoded(frames: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, frames, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


FORMATS = [("WAV", "PCM_16", "wav"), ("FLAC", "PCM_16", "flac"), ("OGG", "VORBIS", "ogg")]
LAYOUTS = [(44100, 2), (16000, 1)]


@pytest.mark.parametrize("fmt,subtype,ext", FORMATS)
@pytest.mark.parametrize("rate,channels", LAYOUTS)
def test_memory_round_trip_resamples_and_keeps_pitch(fmt, subtype, ext, rate, channels):
    frames = _sine(440.0, 1.5, rate, channels)
    uri = f"memory://io-test-{uuid.uuid4().hex}/clip.{ext}"
    with fsspec.open(uri, "wb") as f:
        f.write(_encoded(frames, rate, fmt, subtype))
    wav = load_audio(uri, sample_rate=24000)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - 36000) <= 2  # 1.5 s at 24 kHz
    assert abs(_dominant_hz(wav, 24000) - 440.0) < 2.0
    assert np.isfinite(wav).all() and 0.4 < np.abs(wav).max() < 0.6
    assert audio_duration(uri) == pytest.approx(1.5, abs=1e-3)


@pytest.mark.parametrize("rate,channels", LAYOUTS)
def test_local_path_round_trip(tmp_path, rate, channels):
    path = tmp_path / "clip.flac"
    sf.write(path, _sine(1000.0, 1.0, rate, channels), rate, subtype="PCM_16")
    wav = load_audio(str(path), sample_rate=24000)
    assert abs(len(wav) - 24000) <= 1
    assert abs(_dominant_hz(wav, 24000) - 1000.0) < 2.0
    native = load_audio(str(path), sample_rate=rate)
    assert len(native) == rate  # no resampling when the rates agree


def test_stereo_is_downmixed_by_mean():
    left = np.full(2000, 0.5, np.float32)
    right = np.full(2000, -0.25, np.float32)
    data = _encoded(np.stack([left, right], 1), 24000, "WAV", "FLOAT")
    np.testing.assert_allclose(decode_audio_bytes(data), 0.125, atol=1e-6)


def test_flac_and_wav_encoders_round_trip_and_clip():
    wav = np.linspace(-1.5, 1.5, 4800).astype(np.float32)
    for encoder in (encode_flac, encode_wav):
        back = decode_audio_bytes(encoder(wav, 24000), 24000)
        assert back.shape == wav.shape
        np.testing.assert_allclose(back, np.clip(wav, -1, 1), atol=1 / 16384)
    assert encode_flac(wav, 24000)[:4] == b"fLaC"
    assert encode_wav(wav, 24000) == encode_wav(wav.copy(), 24000)  # deterministic bytes


def test_encoders_reject_bad_waveforms():
    with pytest.raises(AudioError, match="non-finite"):
        encode_flac(np.array([0.0, np.nan], np.float32), 24000)
    with pytest.raises(AudioError, match="mono"):
        encode_flac(np.zeros((10, 2), np.float32), 24000)
    with pytest.raises(AudioError, match="empty"):
        encode_wav(np.zeros(0, np.float32), 24000)


def test_write_wav_to_url_and_nested_local_path(tmp_path):
    wav = 0.3 * np.sin(np.arange(2400) * 0.05).astype(np.float32)
    url = f"memory://io-test-{uuid.uuid4().hex}/deep/x.wav"
    write_wav(url, wav, 24000)
    np.testing.assert_allclose(load_audio(url), wav, atol=1e-4)
    local = tmp_path / "a" / "b" / "x.wav"
    write_wav(str(local), wav, 24000)
    info = sf.info(str(local))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (24000, 1, 2400, "PCM_16")


# --- every bad-input reason -------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(str(tmp_path / "nope.wav"))
    with pytest.raises(AudioError, match="not found"):
        load_audio(f"memory://io-test-{uuid.uuid4().hex}/nope.flac")
    with pytest.raises(AudioError, match="not found"):
        audio_duration(str(tmp_path / "nope.wav"))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(str(path))


def test_zero_frame_wav():
    data = _encoded(np.zeros(0, np.float32), 16000, "WAV", "PCM_16")
    with pytest.raises(AudioError, match="no samples"):
        decode_audio_bytes(data)


def test_random_bytes_are_not_audio(tmp_path):
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AudioError, match="not an audio file") as err:
        load_audio(str(path))
    assert str(path) in str(err.value) and "0x" not in str(err.value)
    with pytest.raises(AudioError, match="not an audio file"):
        audio_duration(str(path))


def test_truncated_wav():
    data = encode_wav(np.zeros(4000, np.float32), 24000)
    with pytest.raises(AudioError, match="truncated WAV"):
        decode_audio_bytes(data[: len(data) // 2])


def test_truncated_flac():
    data = encode_flac(_sine(300.0, 1.0, 24000, 1)[:, 0], 24000)
    with pytest.raises(AudioError, match="truncated or corrupt|not an audio file"):
        decode_audio_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_samples(bad):
    frames = np.zeros(1000, np.float32)
    frames[500] = bad
    with pytest.raises(AudioError, match="non-finite"):
        decode_audio_bytes(_encoded(frames, 24000, "WAV", "FLOAT"))


def test_window_starts_edge_cases():
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert window_starts(10, 4, 3) == [0, 3, 6]  # 9 + 4 > 10: partial window dropped
    assert window_starts(4, 4, 1) == [0]  # exactly one window
    assert window_starts(3, 4, 1) == []  # shorter than a window
    assert window_starts(0, 4, 1) == []
    assert window_starts(240000, 240000, 24000) == [0]
    assert window_starts(264000, 240000, 24000) == [0, 24000]
    with pytest.raises(ValueError):
        window_starts(10, 0, 1)
    with pytest.raises(ValueError):
        window_starts(10, 4, 0)


# --- streaming: windows of a file read block by block ----------------------------------------


def _write(path, frames: np.ndarray, rate: int, subtype: str = "FLOAT") -> str:
    sf.write(str(path), frames, rate, subtype=subtype)
    return str(path)


def _noise(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)  # [T, C]


@pytest.mark.parametrize("rate,channels", [(44100, 2), (8000, 1), (96000, 6), (24000, 1)])
@pytest.mark.parametrize("window,hop,block_seconds", [(24000, 24000, 0.7), (24000, 10000, 3.0), (10000, 30000, 0.3)])
def test_streamed_windows_are_load_audio_slices_bit_for_bit(tmp_path, rate, channels, window, hop, block_seconds):
    path = _write(tmp_path / "x.wav", _noise(4.3, rate, channels), rate)
    whole = load_audio(path)
    windows = list(stream_windows(path, window, hop, block_seconds=block_seconds, remove_dc=False))
    assert [w.start for w in windows] == window_starts(len(whole), window, hop)  # overlapping, gapped, exact
    for w in windows:
        assert w.error is None and w.wav.dtype == np.float32 and w.wav.shape == (window,)
        np.testing.assert_array_equal(w.wav, whole[w.start : w.start + window])


def test_stream_reads_in_blocks_not_whole(tmp_path):
    path = _write(tmp_path / "x.flac", _noise(6.0, 44100, 2), 44100, "PCM_16")
    stream = AudioStream(path, block_seconds=0.5)
    sizes = [b.shape[0] for b in stream.blocks()]
    assert len(sizes) >= 12 and max(sizes) <= 1.1 * 0.5 * 24000  # soxr hands out its output in uneven chunks
    assert stream.num_samples == sum(sizes) == len(load_audio(path)) and stream.frames_read == 6 * 44100
    assert (stream.source_rate, stream.channels, stream.declared_frames) == (44100, 2, 6 * 44100)


def test_streamed_windows_remove_a_dc_offset_and_leave_music_alone(tmp_path):
    # the choice (see AudioStream.windows): a window mean beyond -40 dBFS is removed, the music is untouched
    t = np.arange(3 * 24000) / 24000
    music = 0.2 * np.sin(2 * np.pi * 440 * t)
    path = _write(tmp_path / "dc.wav", (0.7 + music).astype(np.float32)[:, None], 24000)
    raw = list(stream_windows(path, 24000, 24000, remove_dc=False))
    clean = list(stream_windows(path, 24000, 24000))
    assert len(clean) == 3 and all(abs(w.wav.mean()) > 0.69 for w in raw)
    for r, c in zip(raw, clean):
        assert abs(float(c.wav.mean())) < 1e-6
        np.testing.assert_allclose(c.wav, r.wav - r.wav.mean(), atol=1e-6)
        np.testing.assert_allclose(c.wav, music[c.start : c.start + 24000], atol=1e-5)
    # an offset within the limit is the music's own: the window stays exactly as decoded
    small = _write(tmp_path / "small.wav", (0.005 + music).astype(np.float32)[:, None], 24000)
    whole = load_audio(small)
    for w in stream_windows(small, 24000, 24000):
        np.testing.assert_array_equal(w.wav, whole[w.start : w.start + 24000])


@pytest.mark.parametrize("rate", [24000, 44100])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_samples_flag_their_window_only(tmp_path, rate, bad):
    frames = _noise(5.0, rate, 2)
    frames[int(2.5 * rate), 1] = bad  # one channel of one sample, in the middle of the third second
    path = _write(tmp_path / "x.wav", frames, rate)
    windows = list(stream_windows(path, 24000, 24000, block_seconds=0.8, remove_dc=False))
    assert [w.start for w in windows] == [0, 24000, 48000, 72000, 96000]
    assert [w.error is None for w in windows] == [True, True, False, True, True]
    assert windows[2].wav is None and windows[2].error == "non-finite samples (NaN or Inf) in the window at 2.00 s"
    # the zeroed sample did not poison the resampler: the other windows are the file's audio, sample for sample
    repaired = frames.copy()
    repaired[int(2.5 * rate), 1] = 0.0
    whole = load_audio(_write(tmp_path / "repaired.wav", repaired, rate))
    for w in windows:
        if w.error is None:
            np.testing.assert_array_equal(w.wav, whole[w.start : w.start + 24000])


def test_stream_whole_file_problems_raise_before_any_window(tmp_path):
    def first(uri: str):
        return next(iter(stream_windows(uri, 2400, 2400)))

    with pytest.raises(AudioError, match="file not found"):
        first(str(tmp_path / "nope.wav"))
    with pytest.raises(AudioError, match="file not found"):
        first(f"memory://io-test-{uuid.uuid4().hex}/nope.flac")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty file \(0 bytes\)"):
        first(str(tmp_path / "empty.wav"))
    (tmp_path / "noise.flac").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AudioError, match="not an audio file libsndfile can read"):
        first(str(tmp_path / "noise.flac"))
    data = encode_wav(np.zeros(48000, np.float32), 24000)
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="truncated WAV"):
        first(str(tmp_path / "cut.wav"))
    (tmp_path / "zero.wav").write_bytes(_encoded(np.zeros(0, np.float32), 16000, "WAV", "PCM_16"))
    with pytest.raises(AudioError, match="no samples"):
        first(str(tmp_path / "zero.wav"))
    with pytest.raises(ValueError, match="positive"):
        next(iter(stream_windows(str(tmp_path / "zero.wav"), 0, 1)))


def test_stream_of_a_file_cut_mid_way_gives_the_windows_before_the_break(tmp_path):
    data = encode_flac(0.3 * np.sin(np.arange(6 * 24000) * 0.05).astype(np.float32), 24000)
    path = tmp_path / "cut.flac"
    path.write_bytes(data[: int(len(data) * 0.6)])
    starts = []
    with pytest.raises(AudioError, match="truncated or corrupt audio"):
        for w in stream_windows(str(path), 24000, 24000, block_seconds=0.5):
            starts.append(w.start)
    assert starts and starts == list(range(0, 24000 * len(starts), 24000)) and len(starts) < 6


def test_stream_from_memory_url_and_short_file(tmp_path):
    uri = f"memory://io-test-{uuid.uuid4().hex}/clip.flac"
    with fsspec.open(uri, "wb") as f:
        f.write(_encoded(_sine(440.0, 1.5, 16000, 2), 16000, "FLAC", "PCM_16"))
    stream = AudioStream(uri)
    assert [w.start for w in stream.windows(24000, 12000)] == [0, 12000]
    assert abs(stream.num_samples - 36000) <= 2
    short = AudioStream(uri)
    assert list(short.windows(48000, 48000)) == [] and short.num_samples == stream.num_samples
