"""Serve shim for stage 3 (`models.codec.AudioCodecEngine`): batched VAE decode, and VAE encode of input audio."""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from deployments.batching import apply_batching
from models.codec import AudioCodecEngine
from models.loading import ModelConfig


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32, health_check_period_s=10)
class AudioCodec:
    async def __init__(self, model: ModelConfig):
        self.engine = await asyncio.to_thread(AudioCodecEngine, model)

    def reconfigure(self, user_config: dict) -> None:
        apply_batching(self.decode, user_config)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def decode(self, latents: list[np.ndarray]) -> list[np.ndarray]:
        return await asyncio.to_thread(self.engine.decode, latents)

    async def encode(self, waveform: np.ndarray, kind: str, seed: int | None) -> np.ndarray:
        return await asyncio.to_thread(self.engine.encode, waveform, kind, seed)

    def audio_format(self) -> dict:
        """The VAE's audio contract, for the driver: it reads uploads at this rate and channel count."""
        return {"sample_rate": self.engine.sample_rate, "channels": self.engine.channels}
