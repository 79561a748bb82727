"""Serve shim for stage 1 (`models.condition.ConditionEngine`): batches condition encoding across jobs."""

from __future__ import annotations

import asyncio

from ray import serve

from deployments.batching import apply_batching
from models.condition import ConditionEngine, ConditionRequest, ConditionResult
from models.loading import ModelConfig


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32, health_check_period_s=10)
class ConditionEncoder:
    async def __init__(self, model: ModelConfig):
        self.engine = await asyncio.to_thread(ConditionEngine, model)

    def reconfigure(self, user_config: dict) -> None:
        apply_batching(self.encode, user_config)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def encode(self, requests: list[ConditionRequest]) -> list[ConditionResult]:
        return await asyncio.to_thread(self.engine.encode, requests)
