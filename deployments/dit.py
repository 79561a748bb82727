"""Serve shim for stage 2 (`models.dit.DiTEngine`): batches sampling across jobs and reports diffusion steps."""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from deployments.batching import apply_batching
from jobs.config import QueueConfig
from jobs.metrics import metrics
from jobs.registry import registry_actor
from models.dit import DiTEngine, DiTRequest
from models.loading import ModelConfig


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16, health_check_period_s=10)
class DiT:
    async def __init__(self, model: ModelConfig, registry_name: str, queue: QueueConfig):
        self.engine = await asyncio.to_thread(DiTEngine, model)
        await asyncio.to_thread(self.engine.warm_up)
        self.registry = registry_actor(registry_name, queue)

    def reconfigure(self, user_config: dict) -> None:
        apply_batching(self.generate, user_config)

    async def ready(self) -> bool:
        return True

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate(self, requests: list[DiTRequest]) -> list[np.ndarray]:
        metrics().stage_batch_size.observe(len(requests), tags={"stage": "dit"})
        return await asyncio.to_thread(self.engine.generate, requests, self._on_step)

    def _on_step(self, job_ids: list[str], step: int, total: int, seconds: float) -> None:
        metrics().dit_step_seconds.observe(seconds)
        self.registry.report_steps.remote(job_ids, step, total)  # fire and forget: progress is advisory
