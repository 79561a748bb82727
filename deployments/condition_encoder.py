"""Serve shim for stage 1 (`models.condition.ConditionEngine`): batches condition encoding across jobs."""

from __future__ import annotations

import logging
import time

from ray import serve

from deployments.stage import StageReplica, apply_batching
from jobs.metrics import metrics
from models.condition import ConditionEngine, ConditionRequest, ConditionResult
from models.loading import ModelConfig

logger = logging.getLogger(__name__)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32, health_check_period_s=10)
class ConditionEncoder(StageReplica):
    engine_class, stage = ConditionEngine, "condition"

    async def __init__(self, model: ModelConfig):
        await self.start(model)

    def reconfigure(self, user_config: dict) -> None:
        apply_batching(self.encode, user_config)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def encode(self, requests: list[ConditionRequest]) -> list[ConditionResult]:
        metrics().stage_batch_size.observe(len(requests), tags={"stage": "condition"})
        start = time.perf_counter()
        results = await self.guard.run(self.engine.encode, requests)
        logger.info("condition batch of %d in %.3f s, jobs %s", len(requests), time.perf_counter() - start,
                    [r.tag for r in requests])
        return results
