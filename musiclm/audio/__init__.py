"""Audio I/O (any libsndfile format from any fsspec URL, mono, soxr-resampled; whole or streamed in
windows) and the log-mel front end.

The mel module (torch) is imported lazily so that numpy-only users of the I/O functions — the demo
corpus's worker processes, Beam decode steps — do not pay torch's import time.
"""

from typing import TYPE_CHECKING

from musiclm.audio.io import (
    AudioError,
    AudioStream,
    AudioWindow,
    audio_duration,
    decode_audio_bytes,
    encode_flac,
    encode_wav,
    load_audio,
    stream_windows,
    window_starts,
    write_wav,
)

if TYPE_CHECKING:
    from musiclm.audio.mel import MelSpectrogram, hz_to_mel, mel_filterbank, mel_to_hz

_MEL_NAMES = ("MelSpectrogram", "hz_to_mel", "mel_filterbank", "mel_to_hz")

__all__ = [
    "AudioError",
    "AudioStream",
    "AudioWindow",
    "MelSpectrogram",
    "audio_duration",
    "decode_audio_bytes",
    "encode_flac",
    "encode_wav",
    "hz_to_mel",
    "load_audio",
    "mel_filterbank",
    "mel_to_hz",
    "stream_windows",
    "window_starts",
    "write_wav",
]


def __getattr__(name: str):
    if name in _MEL_NAMES:
        from musiclm.audio import mel

        return getattr(mel, name)
    raise AttributeError(f"module 'musiclm.audio' has no attribute {name!r}")
