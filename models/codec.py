"""Stage 3: the Oobleck VAE. Decode DiT latents to 48 kHz stereo; encode source / reference audio to latents."""

from __future__ import annotations

import logging
import math
import time
import types
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

from models.loading import ModelConfig, load_components, load_vae_config, no_grad, pipeline_view

if TYPE_CHECKING:  # torch, like diffusers, is imported where the engine computes, not with the module
    import torch
    from diffusers import AutoencoderOobleck

logger = logging.getLogger(__name__)

PARTS = ["vae"]


class AudioCodecEngine:
    """`AutoencoderOobleck` decode (+ the pipeline's output normalisation) and encode."""

    # Bounded memory for long audio, in latent frames (1 frame = `hop_length` samples). Oobleck is convolutional with a
    # receptive field of about +-8.3 frames in the decoder and +-7 in the encoder (a perturbed frame changes nothing
    # further away), so with these overlaps the part kept of each tile is what the whole-length pass computes, up to
    # float rounding: ~1e-6 on CPU (tests/models/test_codec_tiling.py); on CUDA, bit for bit without TF32, and ~1e-4
    # with cuDNN's default TF32 convolutions (any change of shape moves results that much there). Inputs no longer
    # than one tile are never split.
    DECODE_TILE_FRAMES = 512  # diffusers' default: items up to 20.48 s are decoded whole
    DECODE_OVERLAP_FRAMES = 32  # context each side: 14% extra decoder work (diffusers' default, 64, costs 33%)
    DECODE_PASS_FRAMES = 1024  # slicing over outputs: at most this many outputs x frames per decoder call
    ENCODE_TILE_FRAMES = 300  # 12 s windows (inputs up to 12 s are encoded whole) ...
    ENCODE_OVERLAP_FRAMES = 25  # ... of which 1 s each side is context: 10 s kept per window

    def __init__(self, config: ModelConfig, tiling: bool = True):
        """`tiling=False` decodes and encodes every input in one pass (memory grows with outputs x seconds); it is
        there to measure that (benchmarks/codec_memory.py) and to compare results."""
        self.config = config = config.for_stage("codec")
        self.vae = load_components(config, PARTS)["vae"]
        self.pipe = pipeline_view({"vae": self.vae}, load_vae_config(config))
        self.device = config.torch_device()
        self.tiling = tiling
        if tiling:
            hop = self.hop_length
            self.vae.enable_tiling()
            self.vae.tile_latent_min_length = self.DECODE_TILE_FRAMES
            self.vae.tile_latent_overlap = self.DECODE_OVERLAP_FRAMES
            self.vae.tile_sample_min_length = self.ENCODE_TILE_FRAMES * hop
            self.vae.tile_sample_overlap = self.ENCODE_OVERLAP_FRAMES * hop
            # diffusers' own `_tiled_encode` drops a frame at some lengths (see `_tiled_encode` here). An
            # instance attribute: the pipeline's reference path (`vae.encode`) goes through it too.
            self.vae._tiled_encode = types.MethodType(_tiled_encode, self.vae)
        if config.compiled("codec"):
            self.vae.decoder.compile()

    def warm_up(self) -> None:
        """Decode one second of zero latents before traffic arrives."""
        frames = math.ceil(self.pipe.latents_per_second)
        self.decode([np.zeros((1, frames, self.vae.config.decoder_input_channels), np.float32)])

    @property
    def sample_rate(self) -> int:
        return int(self.vae.config.sampling_rate)

    @property
    def channels(self) -> int:
        return int(self.vae.config.audio_channels)

    @property
    def hop_length(self) -> int:
        return math.prod(self.vae.config.downsampling_ratios)

    @no_grad
    def decode(self, latents: list[np.ndarray]) -> list[np.ndarray]:
        """Per item `(n, frames, latent_channels)` -> `(n, channels, frames * hop)` float32 in [-1, 1].

        Items with the same frame count are decoded together, in decoder calls of at most `DECODE_PASS_FRAMES`
        outputs x frames (one output at a time above that; each long output in overlapping time tiles), written into
        the result as they come. Normalisation is per output, as in `AceStepPipeline.__call__` step 11: divide by the
        peak when it exceeds 1, then scale the peak to -1 dBFS.
        """
        start = time.perf_counter()
        groups: dict[int, list[int]] = defaultdict(list)
        for index, item in enumerate(latents):
            groups[item.shape[1]].append(index)
        results: list[np.ndarray | None] = [None] * len(latents)
        for indices in groups.values():
            audio = self._decode_rows(np.concatenate([latents[i] for i in indices]))
            offset = 0
            for i in indices:
                n = latents[i].shape[0]
                results[i] = audio[offset:offset + n]
                offset += n
        logger.info("decoded %d items in %.2f s", len(latents), time.perf_counter() - start)
        return results

    def _decode_rows(self, latents: np.ndarray) -> np.ndarray:
        """`(rows, frames, latent_channels)` -> normalised `(rows, channels, frames * hop)` float32."""
        import torch

        rows, frames = latents.shape[:2]
        per_call = max(1, self.DECODE_PASS_FRAMES // frames) if self.tiling else rows
        out = None
        for first in range(0, rows, per_call):
            batch = torch.from_numpy(latents[first:first + per_call]).to(self.device, self.vae.dtype)
            audio = _normalise(self.vae.decode(batch.transpose(1, 2)).sample.float())
            if per_call >= rows and audio.device.type == "cpu":
                return audio.numpy()  # one call on the CPU: the decoder's output is the result, no copy
            if out is None:
                out = np.empty((rows, *audio.shape[1:]), np.float32)
            torch.from_numpy(out[first:first + audio.shape[0]]).copy_(audio)
            del audio
        return out

    @no_grad
    def encode(self, waveform: np.ndarray, kind: str, seed: int | None = None) -> np.ndarray:
        """`(channels, samples)` at `sample_rate` -> latents `(frames, latent_channels)`.

        `kind="reference"` first takes the pipeline's 30 s timbre excerpt (front, middle and back 10 s). The VAE
        posterior is sampled, as upstream does; `seed` makes that sample reproducible (None: torch's global RNG).
        """
        import torch

        audio = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).to(self.device)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            if kind == "reference":
                latents, _ = self.pipe.prepare_reference_audio_latents(audio, batch_size=1, device=self.device,
                                                                       dtype=torch.float32)
            elif kind == "source":
                latents = self.vae.encode(audio[None].to(self.vae.dtype)).latent_dist.sample().transpose(1, 2)
            else:
                raise ValueError(f"kind must be 'reference' or 'source', got {kind!r}")
        return latents[0].float().cpu().numpy()


def _peak(audio: torch.Tensor) -> torch.Tensor:
    """`audio.abs().amax(dim=[1, 2], keepdim=True)` without a full-size `abs()` temporary."""
    import torch

    return torch.maximum(audio.amax(dim=(1, 2), keepdim=True), audio.amin(dim=(1, 2), keepdim=True).neg())


def _normalise(audio: torch.Tensor) -> torch.Tensor:
    """`AceStepPipeline.__call__` step 11 per output, in place: the pipeline's divide and multiply, the same values."""
    audio.div_(_peak(audio).clamp(min=1.0))  # dividing by 1.0 (peak <= 1) changes nothing, as the pipeline skips it
    return audio.mul_(10.0 ** (-1.0 / 20.0) / _peak(audio).clamp(min=1e-6))


def _tiled_encode(vae: AutoencoderOobleck, x: torch.Tensor) -> torch.Tensor:
    """Encoder features of `x` `(batch, channels, samples)` from overlapping windows, equal to `vae.encoder(x)`.

    Replaces diffusers 0.42.1's `AutoencoderOobleck._tiled_encode` on the engine's VAE. That one rounds its trims in
    samples / hop, so where a window before the last reaches a ragged end (not a multiple of the hop) and the part
    frame is over half a frame, it trims one frame too many: the result is a frame short and every later frame sits
    one place early (e.g. 25.6 or 37.5 frames' worth with 20-frame windows, 4 of context; 15% of lengths there).
    Here every window starts on a multiple of the hop, so each strided conv sees the phase of the whole pass; each
    keeps whole frames; the last runs to the end of the input (the encoder gives floor(samples / hop) frames, the
    tail's partial frame seen as in the whole pass).
    """
    import torch

    hop, samples = vae.hop_length, x.shape[-1]
    overlap = vae.tile_sample_overlap // hop
    core = vae.tile_sample_min_length // hop - 2 * overlap
    if core <= 0:
        raise ValueError(f"tile_sample_min_length must exceed 2 * tile_sample_overlap + {hop} samples")
    total = samples // hop
    pieces = []
    for begin in range(0, total, core):
        end = min(begin + core, total)
        low = max(begin - overlap, 0)
        high = samples if end == total else min(samples, (end + overlap) * hop)
        pieces.append(vae.encoder(x[:, :, low * hop:high])[:, :, begin - low:end - low])
    return torch.cat(pieces, dim=-1)
