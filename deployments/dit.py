"""Serve shim for stage 2 (`models.dit.DiTEngine`): batches sampling across jobs and reports diffusion steps."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from ray import serve

from deployments.stage import StageReplica, apply_batching
from jobs.config import FilesConfig, QueueConfig
from jobs.metrics import metrics
from jobs.registry import RegistryClient
from models.dit import DiTEngine, DiTRequest
from models.loading import ModelConfig

logger = logging.getLogger(__name__)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16, health_check_period_s=10)
class DiT(StageReplica):
    engine_class, stage = DiTEngine, "dit"

    async def __init__(self, model: ModelConfig, registry_name: str, queue: QueueConfig, files: FilesConfig):
        await self.start(model)
        self.registry = RegistryClient(registry_name, queue, files)
        self.loop = asyncio.get_running_loop()

    def reconfigure(self, user_config: dict) -> None:
        apply_batching(self.generate, user_config)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate(self, requests: list[DiTRequest]) -> list[np.ndarray]:
        metrics().stage_batch_size.observe(len(requests), tags={"stage": "dit"})
        return await self.guard.run(self.engine.generate, requests, self._on_step)

    def _on_step(self, job_ids: list[str], step: int, total: int, seconds: float) -> list[str]:
        """Runs in the engine's thread after every step: report progress, learn which jobs stopped (canceled,
        timed out). If the registry cannot answer in time the batch carries on: its jobs' drivers decide."""
        metrics().dit_step_seconds.observe(seconds)
        if job_ids == ["warm-up"]:
            return []
        call = self.registry.call("report_steps", job_ids, step, total)
        try:
            return asyncio.run_coroutine_threadsafe(call, self.loop).result(timeout=5.0)
        except Exception:
            logger.warning("registry did not answer a step report; continuing the batch")
            return []
