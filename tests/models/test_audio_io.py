"""Audio files in and out."""

import io
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from models.audio_io import AudioDecodeError, AudioTooLongError, encode_audio, load_audio, probe_audio
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


LONG_SECONDS = 20 * 60


@pytest.fixture(scope="module")
def long_files(tmp_path_factory) -> dict[str, bytes]:
    """20 minutes of a tone, kept small: an 8 kHz mono CBR MP3 (~2.4 MB) and a 2 kHz 16-bit mono WAV (~4.8 MB)."""
    files = {}
    for fmt, rate, options in [("mp3", 8000, dict(bitrate_mode="CONSTANT", compression_level=0.9)),
                               ("wav", 2000, dict(subtype="PCM_16"))]:
        t = np.arange(LONG_SECONDS * rate) / rate
        buffer = io.BytesIO()
        sf.write(buffer, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format=fmt.upper(), **options)
        files[fmt] = buffer.getvalue()
    return files


@pytest.mark.parametrize("fmt", ["mp3", "wav"])
def test_probe_rejects_long_audio_from_its_header_before_decoding(long_files, fmt, tmp_path, monkeypatch):
    path = tmp_path / f"long.{fmt}"
    path.write_bytes(long_files[fmt])

    def no_decoding(*args, **kwargs):
        raise AssertionError("probe_audio decoded audio it could reject from the header")

    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    for source in (long_files[fmt], path):
        with pytest.raises(AudioTooLongError, match=r"^the audio is 1200\.\d s long; this server accepts at most "
                                                    r"600 s$") as error:
            probe_audio(source, max_seconds=600)
        assert isinstance(error.value, AudioDecodeError)  # the ingress answers 400 for both


@pytest.mark.parametrize("fmt", ["mp3", "wav"])
def test_probe_decodes_long_audio_in_bounded_memory(long_files, fmt):
    """Without a limit the whole file is decoded (a cut one fails), in blocks: no whole-file float array."""
    tracemalloc.start()
    try:
        assert probe_audio(long_files[fmt]) == pytest.approx(LONG_SECONDS, abs=0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole = LONG_SECONDS * sf.info(io.BytesIO(long_files[fmt])).samplerate * 4
    assert peak < 2**20 < whole / 8, f"probe_audio allocated {peak} bytes; the decoded file is {whole}"


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "MP3"])
def test_probe_returns_the_duration_of_a_short_file_under_the_limit(fmt, tmp_path):
    data = wav_bytes(1.5, 44100, 2, fmt=fmt)
    path = tmp_path / f"a.{fmt.lower()}"
    path.write_bytes(data)
    for source in (data, path):
        assert probe_audio(source, max_seconds=600) == pytest.approx(1.5, abs=0.03)
    with pytest.raises(AudioTooLongError, match=r"^the audio is 1\.5 s long; this server accepts at most 1 s$"):
        probe_audio(data, max_seconds=1)


def test_probe_finds_non_finite_samples_past_the_first_block():
    samples = np.zeros(3 * 65536, np.float32)
    samples[-10] = np.nan
    buffer = io.BytesIO()
    sf.write(buffer, samples, 48000, format="WAV", subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match="non-finite"):
        probe_audio(buffer.getvalue())
    with pytest.raises(AudioDecodeError, match="truncated"):
        probe_audio(wav_bytes(3.0)[:-1000])
