"""Audio files in and out."""

import io
import tracemalloc

import av
import numpy as np
import pytest
import soundfile as sf

from jobs.schemas import AUDIO_FORMATS, MP3_BITRATES
from jobs.storage import ResultStore
from models.audio_io import (FORMATS, AudioDecodeError, AudioTooLongError, encode_audio, load_audio, media_type,
                             probe_audio)
from tests.conftest import EXTRA_SAMPLES, decode_audio, mp3_frame_bitrates, wav_bytes


@pytest.mark.parametrize("fmt", ["mp3", "wav", "flac"])
def test_encode_roundtrip(fmt):
    waveform = 0.5 * np.sin(np.linspace(0, 200, 48000 * 2)).reshape(2, -1).astype(np.float32)
    data = encode_audio(waveform, 48000, fmt)
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.channels, info.format) == (48000, 2, fmt.upper())
    assert abs(info.duration - 1.0) < 0.01


RATE = 48000
WRITTEN = RATE + 77  # not a whole number of any codec's frames


def stereo_tones(samples: int = WRITTEN, peak: float = 0.5) -> np.ndarray:
    """`(2, samples)` float32: 440 Hz on the left, 1 kHz at half the level on the right (a swap would show)."""
    t = np.arange(samples) / RATE
    return np.stack([peak * np.sin(2 * np.pi * 440 * t), peak / 2 * np.sin(2 * np.pi * 1000 * t)]).astype(np.float32)


def test_every_request_format_has_an_encoder_a_result_key_and_a_media_type():
    assert set(AUDIO_FORMATS) == set(FORMATS)
    job = "00000000-0000-0000-0000-000000000000"
    for fmt, output in FORMATS.items():
        assert ResultStore.is_key(ResultStore.key(job, 0, output.extension)), fmt
        assert media_type(output.extension) == output.media_type
    assert {fmt: (o.extension, o.media_type) for fmt, o in FORMATS.items() if fmt not in ("mp3", "wav", "flac")} == {
        "opus": ("opus", "audio/ogg; codecs=opus"), "aac": ("aac", "audio/aac"), "wav32": ("wav", "audio/wav")}


@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_each_format_decodes_to_the_signal_written(fmt):
    """Rate, channels and length (within `EXTRA_SAMPLES`, the codec's delay and padding), and the waveform itself:
    the lossless formats exactly as 16-bit PCM or float32, the lossy ones within 15% RMS error once aligned (they
    measure 0.7% mp3, 5% aac, 4-8% Opus, which keeps the waveform's shape less closely than its sound)."""
    waveform = stereo_tones()
    decoded, rate = decode_audio(encode_audio(waveform, RATE, fmt), fmt)
    least, most = EXTRA_SAMPLES[fmt]
    assert (rate, decoded.shape[0], decoded.dtype) == (RATE, 2, np.float32)
    assert WRITTEN + least <= decoded.shape[1] <= WRITTEN + most
    aligned = decoded[:, least: least + WRITTEN]  # aac: its priming samples come first
    if fmt == "wav32":
        np.testing.assert_array_equal(aligned, waveform)
    elif fmt in ("wav", "flac"):
        np.testing.assert_allclose(aligned, waveform, atol=1 / 2**15)
    else:
        error = np.sqrt(np.mean((aligned - waveform) ** 2, axis=1) / np.mean(waveform**2, axis=1))
        assert (error < 0.15).all(), error


def test_wav32_keeps_float_samples_beyond_full_scale():
    """A float file needs no clipping: the decoder's samples round-trip bit for bit, peaks over 1.0 included."""
    waveform = stereo_tones(peak=1.5)
    data = encode_audio(waveform, RATE, "wav32")
    assert sf.info(io.BytesIO(data)).subtype == "FLOAT"
    decoded, _ = decode_audio(data, "wav32")
    np.testing.assert_array_equal(decoded, waveform)
    assert decoded.max() == waveform.max() > 1.0
    assert decode_audio(encode_audio(waveform, RATE, "wav"), "wav")[0].max() <= 1.0  # 16-bit PCM clips


def test_opus_and_aac_containers():
    info = sf.info(io.BytesIO(encode_audio(stereo_tones(), RATE, "opus")))
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("OGG", "OPUS", RATE, 2)
    with av.open(io.BytesIO(encode_audio(stereo_tones(), RATE, "aac"))) as container:
        stream = container.streams.audio[0]
        assert (container.format.name, stream.codec_context.name, stream.codec_context.profile) == ("aac", "aac", "LC")
        assert (stream.rate, stream.channels) == (RATE, 2)


@pytest.mark.parametrize("kbps", MP3_BITRATES)
def test_mp3_bitrate_is_constant_at_the_bitrate_asked(kbps):
    data = encode_audio(stereo_tones(), RATE, "mp3", mp3_bitrate=kbps)
    rates, first = mp3_frame_bitrates(data)
    assert set(rates) == {kbps} and b"Info" in first
    assert decode_audio(data, "mp3")[0].shape == (2, WRITTEN)


def test_mp3_below_64_kbps_loses_its_gapless_info():
    """Why MP3_BITRATES starts at 64: at 56 kbps a 48 kHz frame is too small for LAME's Info tag, so the decoder
    keeps the encoder's delay and padding."""
    data = encode_audio(stereo_tones(), RATE, "mp3", mp3_bitrate=56)
    rates, first = mp3_frame_bitrates(data)
    assert set(rates) == {56} and b"Info" not in first
    assert decode_audio(data, "mp3")[0].shape[1] > WRITTEN + 1000


def test_mp3_without_a_bitrate_is_variable_as_before():
    """None: libsndfile's default for mp3, LAME's VBR (quality V4): noise and silence get different bitrates."""
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, (2, RATE)).astype(np.float32)
    rates, first = mp3_frame_bitrates(encode_audio(np.concatenate([noise, 0 * noise], axis=1), RATE, "mp3"))
    assert len(set(rates)) > 2 and b"Xing" in first


def test_mp3_bitrate_needs_mpeg1_rates():
    with pytest.raises(ValueError, match="32 kHz"):
        encode_audio(stereo_tones(), 24000, "mp3", mp3_bitrate=128)


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
