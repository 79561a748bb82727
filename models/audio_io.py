"""Audio files in and out: decode uploads with soundfile and resample with torchaudio; encode the output formats,
mp3 / wav / flac / Ogg Opus / 32-bit float WAV with soundfile (libsndfile) and ADTS AAC with PyAV (FFmpeg)."""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf


@dataclass(frozen=True)
class OutputFormat:
    """How one `audio_format` is written and served."""

    extension: str  # of the result file, `<job_id>/<index>.<extension>`
    media_type: str  # the Content-Type it is served with
    container: str  # soundfile's `format`, or for aac PyAV's muxer
    subtype: str | None = None  # soundfile's `subtype`


FORMATS = {
    "mp3": OutputFormat("mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III"),
    "wav": OutputFormat("wav", "audio/wav", "WAV", "PCM_16"),
    "flac": OutputFormat("flac", "audio/flac", "FLAC", "PCM_16"),
    # An Ogg Opus file is audio/ogg, the codecs parameter naming what is inside (RFC 7845 section 9).
    "opus": OutputFormat("opus", "audio/ogg; codecs=opus", "OGG", "OPUS"),
    # ADTS: bare AAC frames, each with its own header (the .aac of FFmpeg and of upstream).
    "aac": OutputFormat("aac", "audio/aac", "adts"),
    "wav32": OutputFormat("wav", "audio/wav", "WAV", "FLOAT"),
}
MEDIA_TYPES = {output.extension: output.media_type for output in FORMATS.values()}  # by extension, for /v1/audio
AAC_BITS_PER_CHANNEL = 96_000  # 192 kbps for stereo, where FFmpeg's AAC encoder would default to 128 kbps


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
        import torch  # here, not at the top: an AudioCodec replica that never resamples starts without it
        import torchaudio

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


def encode_audio(waveform: np.ndarray, sample_rate: int, fmt: str, mp3_bitrate: int | None = None) -> bytes:
    """`(channels, samples)` float -> file bytes in `fmt`, a key of `FORMATS`.

    Samples are clipped to [-1, 1], except in wav32: a float file keeps the decoder's samples as they are.
    `mp3_bitrate` (kbps) makes an mp3 constant-bitrate; None keeps libsndfile's default for mp3, LAME's variable
    bitrate at its default quality (V4). Other formats ignore it.
    """
    output = FORMATS[fmt]
    if fmt != "wav32":
        waveform = np.clip(waveform, -1.0, 1.0)
    waveform = np.asarray(waveform, dtype=np.float32)
    if fmt == "aac":
        return _encode_aac(waveform, sample_rate, output.container)
    options = _mp3_constant_bitrate(mp3_bitrate, sample_rate) if fmt == "mp3" and mp3_bitrate is not None else {}
    buffer = io.BytesIO()
    sf.write(buffer, waveform.T, sample_rate, format=output.container, subtype=output.subtype, **options)
    return buffer.getvalue()


def _mp3_constant_bitrate(kbps: int, sample_rate: int) -> dict:
    """soundfile's options for an MP3 at a constant `kbps`.

    libsndfile sets a CBR bitrate from the compression level c in [0, 1] as `(int) (320 - c * 288)` kbps for MPEG-1
    (32 kHz and up; mpeg_l3_encode.c): c is chosen half a kbps short of `kbps`, so that the cast lands on it whatever
    the rounding (and stays below 1, which the VBR mode soundfile sets it in first refuses).
    """
    if sample_rate < 32000:
        raise ValueError(f"mp3_bitrate needs a sample rate of 32 kHz or more (MPEG-1), not {sample_rate} Hz")
    if not 32 <= kbps <= 320:
        raise ValueError(f"mp3_bitrate must be 32 to 320 kbps, not {kbps}")
    return {"bitrate_mode": "CONSTANT", "compression_level": max(0.0, (320 - kbps - 0.5) / 288)}


def _encode_aac(waveform: np.ndarray, sample_rate: int, muxer: str) -> bytes:
    """AAC-LC by FFmpeg's native encoder through PyAV, in `muxer`'s container.

    An ADTS stream cannot say how many samples to drop, so a decoder returns the encoder's 1024 priming samples
    (21 ms at 48 kHz) first and the last frame padded to 1024 samples: 1024 to 2047 samples more than were written.
    """
    import av  # here, not at the top: only aac needs PyAV (~130 MB installed), the other formats do not

    channels = waveform.shape[0]
    layout = {1: "mono", 2: "stereo"}[channels]  # what the VAE gives (mp3 takes no more either)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=muxer) as container:
        stream = container.add_stream("aac", rate=sample_rate, layout=layout)
        stream.codec_context.bit_rate = AAC_BITS_PER_CHANNEL * channels
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(waveform), format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        container.mux(stream.encode(frame))  # PyAV cuts the frame into the encoder's 1024-sample frames
        container.mux(stream.encode(None))
    return buffer.getvalue()


def media_type(extension: str) -> str:
    """The Content-Type of a result file, from its extension (wav and wav32 share .wav and audio/wav)."""
    return MEDIA_TYPES[extension]
