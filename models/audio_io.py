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


def probe_audio(source: str | Path | bytes) -> float:
    """Duration in seconds, reading the whole file so that a truncated one fails here and not in a job."""
    waveform, sample_rate = _read(source)
    return waveform.shape[1] / sample_rate


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
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        with sf.SoundFile(io.BytesIO(raw)) as handle:
            declared, sample_rate, container = handle.frames, handle.samplerate, handle.format
            data = handle.read(dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError, ... for bad input
        raise AudioDecodeError(f"not a readable audio file ({type(exc).__name__})") from exc
    if data.shape[0] == 0:
        raise AudioDecodeError("the audio file has no samples")
    # Compressed formats estimate their length from headers (VBR MP3 without a Xing frame), hence the slack.
    if data.shape[0] < 0.98 * declared or (container == "WAV" and data.shape[0] < _wav_declared_frames(raw)):
        raise AudioDecodeError(f"the audio file is truncated ({data.shape[0]} frames present)")
    if not np.isfinite(data).all():
        raise AudioDecodeError("the audio file has non-finite samples")
    return data.T, int(sample_rate)


def _wav_declared_frames(raw: bytes) -> int:
    """Frames a PCM WAV header promises (libsndfile quietly shortens a cut file to what is present)."""
    try:
        with wave.open(io.BytesIO(raw)) as handle:
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
