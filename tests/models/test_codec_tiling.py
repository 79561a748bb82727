"""Bounded-memory codec: long audio is decoded / encoded in overlapping time tiles and decoded one output slice at a
time, with the results of one whole pass (to float rounding); inputs shorter than a tile are not split at all.

Tile sizes are shrunk here (on the engine's own VAE) so that a few seconds of audio cross several tiles."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderOobleck

from models.codec import AudioCodecEngine, _normalise, _tiled_encode
from models.loading import ModelConfig

CONFIG = ModelConfig(preset="tiny")
HOP = 1920


@pytest.fixture(scope="module")
def tiled():
    return AudioCodecEngine(CONFIG)


@pytest.fixture(scope="module")
def whole():
    return AudioCodecEngine(CONFIG, tiling=False)


@pytest.fixture
def small_tiles(tiled, monkeypatch):
    """Decode tiles of 64 frames (12 each side of context), encode windows of 40 frames (10 each side)."""
    monkeypatch.setattr(tiled.vae, "tile_latent_min_length", 64)
    monkeypatch.setattr(tiled.vae, "tile_latent_overlap", 12)
    monkeypatch.setattr(tiled.vae, "tile_sample_min_length", 40 * HOP)
    monkeypatch.setattr(tiled.vae, "tile_sample_overlap", 10 * HOP)
    return tiled


def test_short_inputs_take_the_untiled_path_unchanged(tiled, whole):
    """What the parity tests rely on: below one tile, the tiled engine runs exactly the old single pass."""
    latents = np.random.default_rng(0).standard_normal((2, 50, 64), dtype=np.float32)
    np.testing.assert_array_equal(tiled.decode([latents])[0], whole.decode([latents])[0])
    source = np.random.default_rng(1).uniform(-0.5, 0.5, size=(2, 48000)).astype(np.float32)
    np.testing.assert_array_equal(tiled.encode(source, "source", seed=3), whole.encode(source, "source", seed=3))


def test_tiled_decode_equals_one_pass(small_tiles, whole, monkeypatch):
    rng = np.random.default_rng(2)
    items = [rng.standard_normal((1, 70, 64), dtype=np.float32), rng.standard_normal((1, 67, 64), dtype=np.float32),
             rng.standard_normal((1, 70, 64), dtype=np.float32)]
    expected = whole.decode(items)
    calls = []
    hook = small_tiles.vae.decoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    try:
        for pass_frames, batches in ((1024, {2, 1}), (70, {1})):  # the two 70-frame outputs at once, or one by one
            monkeypatch.setattr(small_tiles, "DECODE_PASS_FRAMES", pass_frames)
            calls.clear()
            got = small_tiles.decode(items)
            assert {shape[0] for shape in calls} == batches and max(shape[-1] for shape in calls) <= 64  # tiles
            for ours, theirs in zip(got, expected):
                assert ours.shape == theirs.shape and ours.dtype == np.float32
                np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
                assert np.abs(ours).max(axis=(1, 2)) == pytest.approx(10 ** (-1 / 20), rel=1e-6)
    finally:
        hook.remove()


def test_tiled_encode_equals_one_pass(small_tiles, whole):
    """45.3 frames' worth: windows keep frames 0-20, 20-40 and 40-45, the last one with the ragged 0.3 frame."""
    source = np.random.default_rng(4).uniform(-0.5, 0.5, size=(2, int(45.3 * HOP))).astype(np.float32)
    windows = []
    hook = small_tiles.vae.encoder.register_forward_hook(lambda module, args, out: windows.append(args[0].shape[-1]))
    try:
        ours = small_tiles.encode(source, "source", seed=5)
    finally:
        hook.remove()
    assert windows == [30 * HOP, source.shape[1] - 10 * HOP, source.shape[1] - 30 * HOP]
    theirs = whole.encode(source, "source", seed=5)
    assert ours.shape == theirs.shape == (45, 64)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


class _FrameMeans(torch.nn.Module):
    """A stand-in encoder with the length arithmetic of Oobleck's (floor(samples / hop) frames, zero padding) and
    one frame of context each side: frame j is the mean of samples [(j - 1) * hop, (j + 2) * hop). A lost or shifted
    frame shows, and so does a kept frame that was computed at a window's edge (without its context)."""

    def forward(self, x):
        padded = torch.nn.functional.pad(x, (HOP, HOP))
        return padded.unfold(-1, 3 * HOP, HOP)[..., :x.shape[-1] // HOP, :].mean(-1)


@pytest.mark.parametrize("frames", [24.55, 25.6, 31.5, 37.5, 44.0, 45.3, 60.0, 61.99])
def test_tiled_encode_keeps_every_frame_in_place(frames):
    """20-frame windows with 4 frames of context each side, at lengths on and off the hop. diffusers 0.42.1's own
    `_tiled_encode` drops a frame at some ragged lengths (24.55, 25.6, 37.5 here): why models/codec.py replaces it."""
    vae = SimpleNamespace(encoder=_FrameMeans(), hop_length=HOP, tile_sample_min_length=20 * HOP,
                          tile_sample_overlap=4 * HOP)
    x = torch.arange(int(frames * HOP), dtype=torch.float64).reshape(1, 1, -1)
    whole = vae.encoder(x)
    np.testing.assert_array_equal(_tiled_encode(vae, x), whole)
    if frames in (24.55, 25.6, 37.5):  # if this fails, diffusers was fixed and the replacement can go
        assert AutoencoderOobleck._tiled_encode(vae, x).shape[-1] == whole.shape[-1] - 1


def test_normalisation_in_place_gives_the_pipelines_values():
    audio = torch.randn(3, 2, 5000) * torch.tensor([0.3, 1.0, 4.0])[:, None, None]
    peak = audio.abs().amax(dim=[1, 2], keepdim=True)  # AceStepPipeline.__call__, step 11
    expected = audio / peak.clamp(min=1.0)
    expected = expected * (10.0 ** (-1.0 / 20.0) / expected.abs().amax(dim=[1, 2], keepdim=True).clamp(min=1e-6))
    got = audio.clone()
    assert _normalise(got).data_ptr() == got.data_ptr()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
