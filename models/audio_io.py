"""Audio files in and out: decode uploads with soundfile and resample with torchaudio; encode mp3 / wav / flac."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

FORMATS = {"mp3": ("MP3", "audio/mpeg"), "wav": ("WAV", "audio/wav"), "flac": ("FLAC", "audio/flac")}


class AudioDecodeError(ValueError):
    """The bytes are not audio soundfile can read (or hold no samples)."""


class AudioTooLongError(AudioDecodeError):
    """The audio is longer than the server accepts (its message names both lengths)."""


_PROBE_BLOCK_FRAMES = 65536  # frames decoded at a time by probe_audio: ~0.5 MB of float32 stereo, whatever the file


def probe_audio(source: str | Path | bytes, max_seconds: float | None = None) -> float:
    """Duration in seconds, decoding the whole file so that a truncated one fails here and not in a job.

    The header's length is checked against `max_seconds` before anything is decoded (`AudioTooLongError`); then the
    file is decoded in blocks of `_PROBE_BLOCK_FRAMES` (memory does not grow with its length), and the decoded length
    is checked again as it grows (a VBR MP3's header length is an estimate). A path is read from disk as it is
    decoded; bytes are not copied.
    """
    try:
        with sf.SoundFile(_file(source)) as handle:
            declared, sample_rate, container = handle.frames, handle.samplerate, handle.format
            _check_length(declared / sample_rate, max_seconds)
            frames = 0
            buffer = np.empty((_PROBE_BLOCK_FRAMES, handle.channels), np.float32)
            while True:
                block = handle.read(_PROBE_BLOCK_FRAMES, dtype="float32", always_2d=True, out=buffer)
                if not len(block):
                    break
                if not np.isfinite(block).all():
                    raise AudioDecodeError("the audio file has non-finite samples")
                frames += len(block)
                _check_length(frames / sample_rate, max_seconds, at_least=True)
    except AudioDecodeError:
        raise
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError, ... for bad input
        raise AudioDecodeError(f"not a readable audio file ({type(exc).__name__})") from exc
    _check_frames(frames, declared, container, source)
    return frames / sample_rate


def _check_length(seconds: float, max_seconds: float | None, at_least: bool = False) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise AudioTooLongError(f"the audio is {'at least ' if at_least else ''}{seconds:.1f} s long; "
                                f"this server accepts at most {max_seconds:g} s")


def load_audio(source: str | Path | bytes, sample_rate: int, channels: int) -> np.ndarray:
    """Decode to float32 `(channels, samples)` at `sample_rate`: mono is duplicated, extra channels are dropped."""
    waveform, source_rate = _read(source)
    if waveform.shape[0] == 1 and channels > 1:
        waveform = np.repeat(waveform, channels, axis=0)
    waveform = waveform[:channels]
    if source_rate != sample_rate:
        waveform = torchaudio.functional.resample(torch.from_numpy(waveform), source_rate, sample_rate).numpy()
    return np.ascontiguousarray(waveform, dtype=np.float32)


def _read(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    try:
        with sf.SoundFile(_file(source)) as handle:
            declared, sample_rate, container = handle.frames, handle.samplerate, handle.format
            data = handle.read(dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError, ... for bad input
        raise AudioDecodeError(f"not a readable audio file ({type(exc).__name__})") from exc
    _check_frames(data.shape[0], declared, container, source)
    if not np.isfinite(data).all():
        raise AudioDecodeError("the audio file has non-finite samples")
    return data.T, int(sample_rate)


def _file(source: str | Path | bytes) -> str | io.BytesIO:
    """What soundfile and `wave` open: the path itself (read as needed), or the bytes in a BytesIO (which shares them
    with the bytes object rather than copying them)."""
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def _check_frames(present: int, declared: int, container: str, source: str | Path | bytes) -> None:
    if present == 0:
        raise AudioDecodeError("the audio file has no samples")
    # Compressed formats estimate their length from headers (VBR MP3 without a Xing frame), hence the slack.
    if present < 0.98 * declared or (container == "WAV" and present < _wav_declared_frames(source)):
        raise AudioDecodeError(f"the audio file is truncated ({present} frames present)")


def _wav_declared_frames(source: str | Path | bytes) -> int:
    """Frames a PCM WAV header promises (libsndfile quietly shortens a cut file to what is present)."""
    try:
        with wave.open(_file(source)) as handle:
            return handle.getnframes()
    except (wave.Error, EOFError):  # float or extensible WAV: the stdlib cannot tell, soundfile's count stands
        return 0


def encode_audio(waveform: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """`(channels, samples)` float in [-1, 1] -> file bytes in `fmt` (soundfile's default subtype per format)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(waveform, -1.0, 1.0).T, sample_rate, format=FORMATS[fmt][0])
    return buffer.getvalue()


def media_type(fmt: str) -> str:
    return FORMATS[fmt][1]
