"""Audio files in and out."""

import io

import numpy as np
import pytest
import soundfile as sf

from models.audio_io import AudioDecodeError, encode_audio, load_audio, probe_audio
from tests.conftest import wav_bytes


@pytest.mark.parametrize("fmt", ["mp3", "wav", "flac"])
def test_encode_roundtrip(fmt):
    waveform = 0.5 * np.sin(np.linspace(0, 200, 48000 * 2)).reshape(2, -1).astype(np.float32)
    data = encode_audio(waveform, 48000, fmt)
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.channels, info.format) == (48000, 2, fmt.upper())
    assert abs(info.duration - 1.0) < 0.01


def test_load_resamples_and_duplicates_mono():
    audio = load_audio(wav_bytes(0.5, 22050, 1), 48000, 2)
    assert audio.shape == (2, 24000) and audio.dtype == np.float32
    np.testing.assert_array_equal(audio[0], audio[1])
    assert 0.25 < np.abs(audio).max() < 0.35


def test_load_drops_extra_channels():
    assert load_audio(wav_bytes(0.1, 48000, 4), 48000, 2).shape == (2, 4800)


@pytest.mark.parametrize("data", [b"", b"hello", wav_bytes(1.0)[:100], wav_bytes(1.0, fmt="FLAC")[:500]])
def test_bad_audio_is_rejected(data):
    with pytest.raises(AudioDecodeError):
        probe_audio(data)


def test_probe_reads_duration(tmp_path):
    path = tmp_path / "a.flac"
    path.write_bytes(wav_bytes(1.5, 44100, 2, fmt="FLAC"))
    assert probe_audio(path) == pytest.approx(1.5)
