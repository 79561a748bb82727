"""Serve shim for stage 3 (`models.codec.AudioCodecEngine`): batched VAE decode, and VAE encode of input audio."""

from __future__ import annotations

import logging
import time

import numpy as np
from ray import serve

from deployments.stage import FrameBudget, StageReplica
from jobs.config import FilesConfig, QueueConfig
from jobs.metrics import metrics
from models.codec import AudioCodecEngine
from models.loading import ModelConfig

logger = logging.getLogger(__name__)

# Items are (job_id, latents (outputs, frames, channels)): their work is outputs x frames.
_budget = FrameBudget(lambda item: item[1].shape[0] * item[1].shape[1])


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32, health_check_period_s=10)
class AudioCodec(StageReplica):
    engine_class, stage, batched, budget = AudioCodecEngine, "codec", "decode", _budget

    async def __init__(self, model: ModelConfig, registry_name: str, queue: QueueConfig, files: FilesConfig):
        await self.start(model, registry_name, queue, files)

    @serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.02, batch_size_fn=_budget)
    async def decode(self, items: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        """Items are `(job_id, latents (n, frames, channels))`; returns `(n, channels, samples)` each."""
        metrics().stage_batch_size.observe(len(items), tags={"stage": "decode"})
        start = time.perf_counter()
        audio = await self.guard.run(self.engine.decode, [latents for _, latents in items])
        self.jobs_done += len(items)
        logger.info("decode batch of %d in %.3f s, jobs %s", len(items), time.perf_counter() - start,
                    [job_id for job_id, _ in items])
        return audio

    async def encode(self, waveform: np.ndarray, kind: str, seed: int | None, job_id: str = "") -> np.ndarray:
        start = time.perf_counter()
        latents = await self.guard.run(self.engine.encode, waveform, kind, seed)
        logger.info("encoded %s audio (%d samples) in %.3f s, job %s", kind, waveform.shape[-1],
                    time.perf_counter() - start, job_id)
        return latents
