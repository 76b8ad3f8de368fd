"""Reading and writing audio for the pipeline.

Every corpus file, wherever it lives (a local folder, ``memory://``, ``gs://`` through gcsfs), is
opened by fsspec and decoded by libsndfile (WAV, FLAC, OGG/Vorbis, MP3 and the rest of
``soundfile.available_formats()``); channels are averaged to mono and soxr resamples to the system
rate (24 kHz). Two ways in:

- :func:`load_audio` decodes a whole file into one array: for short clips and for callers that need
  all of it (prompts, evaluation).
- :class:`AudioStream` / :func:`stream_windows` read a file block by block and hand out crop windows
  as soon as their samples are in, so an hour-long recording costs a few blocks of memory, not the
  hour. ``soxr.ResampleStream`` keeps the filter state between blocks: the streamed samples are
  the very samples :func:`load_audio` gives (tested bit for bit).

Bad inputs raise :class:`AudioError` with a short human reason so that the Beam jobs can route them
to their dead-letter file instead of crashing or, worse, writing silence/NaN tokens into the shards.
"""

from __future__ import annotations

import io
import struct
from collections import deque
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import NamedTuple

import fsspec
import numpy as np
import soundfile as sf
import soxr

from musiclm.constants import SAMPLE_RATE

__all__ = [
    "AudioError",
    "AudioStream",
    "AudioWindow",
    "audio_duration",
    "decode_audio_bytes",
    "encode_flac",
    "encode_wav",
    "load_audio",
    "stream_windows",
    "window_starts",
    "write_wav",
]

DEFAULT_BLOCK_SECONDS = 5.0
# a window mean beyond -40 dBFS is a DC offset of the recording chain, not music (see AudioStream.windows)
DC_OFFSET_LIMIT = 0.01
_HEAD_BYTES = 1 << 16  # enough for the chunk headers of any ordinary WAV


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


def _wav_truncation(head: bytes, file_size: int) -> str | None:
    """Why a RIFF/WAVE file is cut short, or None; ``head`` is the start of a file of ``file_size`` bytes.

    libsndfile silently shortens the frame count of a WAV whose ``data`` chunk runs past the end of
    the file (an interrupted upload or copy), so a truncated file would otherwise pass as a short
    clip. Streaming writers that leave the size as 0 or 0xFFFFFFFF are not flagged.
    """
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk_id, size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk_id == b"data":
            available = file_size - (pos + 8)
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
    reason = _wav_truncation(data, len(data))
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


# ----------------------------------------------------------------------------- streaming


class AudioWindow(NamedTuple):
    """One crop window of a streamed file.

    ``start`` is its first sample at the stream's rate. ``wav`` is float32 ``[window]``, or None when
    ``error`` says why the window is unusable (it overlaps non-finite samples of the file).
    """

    start: int
    wav: np.ndarray | None
    error: str | None = None


def _open_error(uri: str, err: Exception) -> AudioError:
    if isinstance(err, FileNotFoundError):
        return AudioError(f"file not found: {uri}")
    if isinstance(err, IsADirectoryError):
        return AudioError(f"not a file but a directory: {uri}")
    return AudioError(f"could not read {uri}: {err}")


class AudioStream:
    """One audio file read block by block as float32 mono at ``sample_rate``; never held whole.

        stream = AudioStream("gs://corpus/set.flac")
        for window in stream.windows(window=240_000, hop=240_000):
            ...                              # AudioWindow(start, wav[240000], error)
        stream.num_samples                   # samples at 24 kHz, the total once exhausted

    Each block of ``block_seconds`` of the source is downmixed (mean of the channels) and fed to
    one ``soxr.ResampleStream`` (HQ), whose output equals ``load_audio``'s one-shot resampling
    sample for sample. Whole-file problems (missing, empty, not audio, truncated WAV header) raise
    :class:`AudioError` on the first ``next()``; a file that breaks off later (truncated or corrupt
    FLAC/OGG, fewer frames than its header declares) raises when the stream reaches that point,
    after the windows before it. Non-finite samples do not raise: they are replaced by zeros before
    the resampler (a NaN would poison its filter state, and with it every later sample) and each
    window that overlaps them comes out with ``error`` set, so the rest of the file stays usable.
    """

    def __init__(self, uri: str, sample_rate: int = SAMPLE_RATE, block_seconds: float = DEFAULT_BLOCK_SECONDS):
        if block_seconds <= 0:
            raise ValueError(f"block_seconds must be positive, got {block_seconds}")
        self.uri = uri
        self.sample_rate = int(sample_rate)
        self.block_seconds = float(block_seconds)
        self.source_rate: int | None = None
        self.channels: int | None = None
        self.declared_frames: int | None = None  # from the header; None when the format does not say
        self.frames_read = 0  # source frames decoded so far
        self.num_samples = 0  # output samples produced so far
        # output-sample ranges [lo, hi) that came from non-finite input (pruned as windows move past them)
        self.bad_ranges: deque[tuple[int, int]] = deque()

    def blocks(self) -> Iterator[np.ndarray]:
        """Float32 mono blocks at ``sample_rate`` (about ``block_seconds`` each), in order."""
        try:
            opened = fsspec.open(self.uri, "rb")
            raw = opened.open()
        except (OSError, ValueError) as err:  # missing, a directory, permissions, network, unknown protocol
            raise _open_error(self.uri, err) from err
        try:
            yield from self._decode(raw)
        finally:
            raw.close()

    def _decode(self, raw: io.IOBase) -> Iterator[np.ndarray]:
        try:
            head = raw.read(_HEAD_BYTES)
            size = raw.seek(0, io.SEEK_END)
            raw.seek(0)
        except (OSError, ValueError) as err:
            raise _open_error(self.uri, err) from err
        if size == 0:
            raise AudioError("empty file (0 bytes)")
        reason = _wav_truncation(head, size)
        if reason is not None:
            raise AudioError(reason)
        try:
            sound = sf.SoundFile(raw)
        except (sf.LibsndfileError, RuntimeError, TypeError) as err:
            raise AudioError(f"not an audio file libsndfile can read ({_libsndfile_reason(err)})") from err
        with sound:
            self.source_rate, self.channels = int(sound.samplerate), int(sound.channels)
            declared = int(sound.frames)
            self.declared_frames = declared if 0 < declared < (1 << 62) else None
            if declared == 0:
                raise AudioError("audio has no samples (0 frames)")
            resampler = None
            if self.source_rate != self.sample_rate:
                resampler = soxr.ResampleStream(self.source_rate, self.sample_rate, 1, dtype="float32", quality="HQ")
            ratio = self.sample_rate / self.source_rate
            margin = max(1, self.sample_rate // 200)  # 5 ms: the reach of the resampler's filter around a zeroed sample
            block_frames = max(1, int(self.block_seconds * self.source_rate))
            while True:
                try:
                    frames = sound.read(block_frames, dtype="float32", always_2d=True)  # [n, C]
                except (sf.LibsndfileError, RuntimeError) as err:
                    raise AudioError(f"truncated or corrupt audio ({_libsndfile_reason(err)})") from err
                last = frames.shape[0] == 0
                mono = frames.mean(axis=1, dtype=np.float32)  # [n, C] -> [n]
                bad = np.flatnonzero(~np.isfinite(mono))
                if bad.size:
                    mono[bad] = 0.0
                    # one range per block (first to last bad sample): a conservative, bounded record
                    lo = int(np.floor((self.frames_read + bad[0]) * ratio)) - margin
                    hi = int(np.ceil((self.frames_read + bad[-1] + 1) * ratio)) + margin
                    self.bad_ranges.append((max(lo, 0), hi))
                self.frames_read += frames.shape[0]
                out = mono if resampler is None else resampler.resample_chunk(mono, last=last)
                if out.shape[0]:
                    self.num_samples += out.shape[0]
                    yield np.ascontiguousarray(out, dtype=np.float32)
                if last:
                    break
        if self.frames_read == 0:
            raise AudioError("audio has no samples (0 frames)")
        if self.declared_frames is not None and self.frames_read < self.declared_frames:
            raise AudioError(f"truncated or corrupt audio: decoded {self.frames_read} of {self.declared_frames} frames")

    def _overlaps_bad(self, start: int, end: int) -> bool:
        while self.bad_ranges and self.bad_ranges[0][1] <= start:  # windows only move forward
            self.bad_ranges.popleft()
        return any(lo < end and start < hi for lo, hi in self.bad_ranges)

    def windows(self, window: int, hop: int, remove_dc: bool = True) -> Iterator[AudioWindow]:
        """Every *full* window (as :func:`window_starts` counts them), each as soon as its samples are in.

        ``remove_dc``: subtract the mean of a window whose mean exceeds ``DC_OFFSET_LIMIT`` (-40 dBFS).
        Such an offset is a defect of the recording chain, not music: left in, it costs headroom
        (16-bit FLAC clips at +-1, so a large offset clips the music in audio shards) and codebook
        entries (SoundStream would spend codes reconstructing a constant). Below the limit the window
        is left exactly as decoded: the mean of a window of music is ~1e-4..1e-3, and shifting it would
        only flip near-tie tokens against ``load_audio`` crops. Per window, unlike a high-pass filter:
        no state across windows, which stay independent.
        """
        if window <= 0 or hop <= 0:
            raise ValueError(f"window and hop must be positive, got window={window}, hop={hop}")
        buffer = np.zeros(0, np.float32)  # samples from buffer_start on; never more than a window + a block
        buffer_start, next_start = 0, 0
        for block in self.blocks():
            block_start = buffer_start + buffer.shape[0]
            if next_start > block_start:  # hop > window: the gap between windows is never kept
                skip = min(next_start - block_start, block.shape[0])
                block, block_start = block[skip:], block_start + skip
            if buffer.shape[0]:
                buffer = np.concatenate([buffer, block])
            else:
                buffer, buffer_start = block, block_start
            while next_start + window <= buffer_start + buffer.shape[0]:
                offset = next_start - buffer_start
                if self._overlaps_bad(next_start, next_start + window):
                    seconds = next_start / self.sample_rate
                    yield AudioWindow(next_start, None,
                                      f"non-finite samples (NaN or Inf) in the window at {seconds:.2f} s")
                else:
                    wav = buffer[offset : offset + window].copy()  # a copy: the window must not pin the buffer
                    mean = float(wav.mean(dtype=np.float64))
                    if remove_dc and abs(mean) > DC_OFFSET_LIMIT:
                        wav -= np.float32(mean)
                    yield AudioWindow(next_start, wav)
                next_start += hop
            cut = min(next_start - buffer_start, buffer.shape[0])
            buffer, buffer_start = buffer[cut:], buffer_start + cut


def stream_windows(
    uri: str,
    window: int,
    hop: int,
    sample_rate: int = SAMPLE_RATE,
    *,
    block_seconds: float = DEFAULT_BLOCK_SECONDS,
    remove_dc: bool = True,
) -> Iterator[AudioWindow]:
    """The full crop windows of ``uri`` at ``sample_rate``, read block by block (see :class:`AudioStream`)."""
    return AudioStream(uri, sample_rate, block_seconds).windows(window, hop, remove_dc=remove_dc)


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
