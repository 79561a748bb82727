"""Stage 3: the Oobleck VAE. Decode DiT latents to 48 kHz stereo; encode source / reference audio to latents."""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict

import numpy as np
import torch

from models.loading import ModelConfig, load_components, load_vae_config, pipeline_view

logger = logging.getLogger(__name__)

PARTS = ["vae"]


class AudioCodecEngine:
    """`AutoencoderOobleck` decode (+ the pipeline's output normalisation) and encode."""

    def __init__(self, config: ModelConfig):
        self.config = config = config.for_stage("codec")
        self.vae = load_components(config, PARTS)["vae"]
        self.pipe = pipeline_view({"vae": self.vae}, load_vae_config(config))
        self.device = config.torch_device()
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

    @torch.no_grad()
    def decode(self, latents: list[np.ndarray]) -> list[np.ndarray]:
        """Per item `(n, frames, latent_channels)` -> `(n, channels, frames * hop)` float32 in [-1, 1].

        Items with the same frame count are decoded together. Normalisation is per output, as in
        `AceStepPipeline.__call__` step 11: divide by the peak when it exceeds 1, then scale the peak to -1 dBFS.
        """
        start = time.perf_counter()
        groups: dict[int, list[int]] = defaultdict(list)
        for index, item in enumerate(latents):
            groups[item.shape[1]].append(index)
        results: list[np.ndarray | None] = [None] * len(latents)
        for indices in groups.values():
            batch = torch.from_numpy(np.concatenate([latents[i] for i in indices])).to(self.device, self.vae.dtype)
            audio = self.vae.decode(batch.transpose(1, 2)).sample.float()
            peak = audio.abs().amax(dim=[1, 2], keepdim=True)
            audio = audio / peak.clamp(min=1.0)
            peak = audio.abs().amax(dim=[1, 2], keepdim=True).clamp(min=1e-6)
            audio = (audio * (10.0 ** (-1.0 / 20.0) / peak)).cpu().numpy()
            offset = 0
            for i in indices:
                n = latents[i].shape[0]
                results[i] = audio[offset:offset + n]
                offset += n
        logger.info("decoded %d items in %.2f s", len(latents), time.perf_counter() - start)
        return results

    @torch.no_grad()
    def encode(self, waveform: np.ndarray, kind: str, seed: int | None = None) -> np.ndarray:
        """`(channels, samples)` at `sample_rate` -> latents `(frames, latent_channels)`.

        `kind="reference"` first takes the pipeline's 30 s timbre excerpt (front, middle and back 10 s). The VAE
        posterior is sampled, as upstream does; `seed` makes that sample reproducible (None: torch's global RNG).
        """
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
