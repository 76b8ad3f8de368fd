"""Reading and writing audio for the pipeline.

Every corpus file, wherever it lives (a local folder, ``memory://``, ``gs://`` through gcsfs), goes
through :func:`load_audio`: fsspec opens it, libsndfile decodes it (WAV, FLAC, OGG/Vorbis, MP3 and the
rest of ``soundfile.available_formats()``), channels are averaged to mono and soxr resamples to the
system rate (24 kHz). Bad inputs raise :class:`AudioError` with a short human reason so that the Beam
tokenization job can route them to its dead-letter file instead of crashing or, worse, writing
silence/NaN tokens into the shards.
"""

from __future__ import annotations

import io
import struct
from pathlib import PurePosixPath

import fsspec
import numpy as np
import soundfile as sf
import soxr

from musiclm.constants import SAMPLE_RATE

__all__ = [
    "AudioError",
    "audio_duration",
    "decode_audio_bytes",
    "encode_flac",
    "encode_wav",
    "load_audio",
    "window_starts",
    "write_wav",
]


class AudioError(ValueError):
    """An input that cannot become a clean mono float32 waveform; ``str(err)`` is the reason."""


def _libsndfile_reason(err: Exception) -> str:
    """libsndfile's own message without the ``Error opening <_io.BytesIO object at 0x...>:`` prefix."""
    return str(getattr(err, "error_string", None) or err).strip().rstrip(".")


def _read_uri(uri: str) -> bytes:
    """The raw bytes of ``uri`` (one GET for object stores, which is what decoding needs anyway)."""
    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError as err:
        raise AudioError(f"file not found: {uri}") from err
    except IsADirectoryError as err:
        raise AudioError(f"not a file but a directory: {uri}") from err
    except (OSError, ValueError) as err:  # permissions, network, unknown protocol
        raise AudioError(f"could not read {uri}: {err}") from err


def _wav_truncation(data: bytes) -> str | None:
    """Why a RIFF/WAVE file is cut short, or None.

    libsndfile silently shortens the frame count of a WAV whose ``data`` chunk runs past the end of
    the file (an interrupted upload or copy), so a truncated file would otherwise pass as a short
    clip. Streaming writers that leave the size as 0 or 0xFFFFFFFF are not flagged.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if chunk_id == b"data":
            available = len(data) - (pos + 8)
            if size not in (0, 0xFFFFFFFF) and size > available:
                return f"truncated WAV: the header declares {size} bytes of samples, the file holds {available}"
            return None
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    return None


def decode_audio_bytes(data: bytes, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode one encoded audio file held in memory to float32 mono ``[T]`` at ``sample_rate``.

    Used for the ``flac`` members of audio shards and, through :func:`load_audio`, for every corpus
    file. Raises :class:`AudioError` for empty, non-audio, truncated/corrupt and non-finite input.
    """
    if len(data) == 0:
        raise AudioError("empty file (0 bytes)")
    reason = _wav_truncation(data)
    if reason is not None:
        raise AudioError(reason)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            declared, source_rate = f.frames, f.samplerate
            try:
                frames = f.read(dtype="float32", always_2d=True)  # [T, C]
            except (sf.LibsndfileError, RuntimeError) as err:
                raise AudioError(f"truncated or corrupt audio ({_libsndfile_reason(err)})") from err
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"not an audio file libsndfile can read ({_libsndfile_reason(err)})") from err
    if frames.shape[0] == 0:
        raise AudioError("audio has no samples (0 frames)")
    if 0 < declared < (1 << 62) and frames.shape[0] < declared:
        raise AudioError(f"truncated or corrupt audio: decoded {frames.shape[0]} of {declared} frames")
    if not np.isfinite(frames).all():
        raise AudioError("audio contains non-finite samples (NaN or Inf)")
    mono = frames.mean(axis=1, dtype=np.float32)  # [T, C] -> [T]
    if source_rate != sample_rate:
        mono = soxr.resample(mono, source_rate, sample_rate, quality="HQ")
    if mono.shape[0] == 0:
        raise AudioError(f"audio too short to resample to {sample_rate} Hz")
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_audio(uri: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Load any libsndfile format from any fsspec URL as float32 mono ``[T]`` at ``sample_rate``."""
    try:
        return decode_audio_bytes(_read_uri(uri), sample_rate)
    except AudioError as err:
        if str(err).startswith(("file not found", "could not read", "not a file")):
            raise
        raise AudioError(f"{err}: {uri}") from err


def audio_duration(uri: str) -> float:
    """Duration in seconds from the file header, without decoding (for progress reporting)."""
    try:
        with fsspec.open(uri, "rb") as f:
            info = sf.info(f)
    except FileNotFoundError as err:
        raise AudioError(f"file not found: {uri}") from err
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"not an audio file libsndfile can read ({_libsndfile_reason(err)}): {uri}") from err
    except (OSError, ValueError) as err:
        raise AudioError(f"could not read {uri}: {err}") from err
    return float(info.frames) / float(info.samplerate)


def _pcm16_ready(wav: np.ndarray) -> np.ndarray:
    """Validate a mono waveform and clip it to the 16-bit PCM range."""
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise AudioError(f"expected a mono waveform [T], got shape {tuple(wav.shape)}")
    if wav.shape[0] == 0:
        raise AudioError("cannot encode an empty waveform")
    if not np.isfinite(wav).all():
        raise AudioError("cannot encode non-finite samples (NaN or Inf)")
    return np.clip(wav.astype(np.float32), -1.0, 1.0)


def _encode(wav: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, _pcm16_ready(wav), int(sample_rate), format=fmt, subtype="PCM_16")
    return buf.getvalue()


def encode_flac(wav: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM FLAC bytes of a mono waveform (clipped to [-1, 1]); the shards' ``flac`` member."""
    return _encode(wav, sample_rate, "FLAC")


def encode_wav(wav: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV bytes of a mono waveform (clipped to [-1, 1]); deterministic for equal input."""
    return _encode(wav, sample_rate, "WAV")


def write_wav(path: str, wav: np.ndarray, sample_rate: int) -> None:
    """Write a 16-bit PCM WAV to a local path or fsspec URL, creating parent folders."""
    data = encode_wav(wav, sample_rate)
    fs, root = fsspec.core.url_to_fs(str(path))
    parent = str(PurePosixPath(root).parent)
    if parent not in ("", "."):
        fs.makedirs(parent, exist_ok=True)
    with fs.open(root, "wb") as f:
        f.write(data)


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
    """Start offsets of every *full* ``window`` that fits in ``num_samples`` with step ``hop``.

    Audio shorter than one window yields no start: the caller decides whether to drop or pad it.
    """
    if window <= 0 or hop <= 0:
        raise ValueError(f"window and hop must be positive, got window={window}, hop={hop}")
    if num_samples < window:
        return []
    return list(range(0, num_samples - window + 1, hop))
