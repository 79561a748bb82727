"""Serve shim for stage 1 (`models.condition.ConditionEngine`): batches condition encoding across jobs; a request
whose inputs the engine rejects fails alone, not with its batch-mates."""

from __future__ import annotations

import logging
import math
import time

from ray import serve

from deployments.stage import FrameBudget, ItemFailure, StageReplica, stamped
from jobs.config import FilesConfig, QueueConfig
from jobs.metrics import metrics
from models.condition import ConditionEngine, ConditionRequest, ConditionResult
from models.loading import ModelConfig

logger = logging.getLogger(__name__)


# Sized by the latent frames of the audio each request conditions (the frame rate is the loaded engine's).
_budget = FrameBudget(lambda request: 0)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32, health_check_period_s=10)
class ConditionEncoder(StageReplica):
    engine_class, stage, batched, budget = ConditionEngine, "condition", "encode_batch", _budget

    async def __init__(self, model: ModelConfig, registry_name: str, queue: QueueConfig, files: FilesConfig,
                       simulate: dict | None = None, served_as: str | None = None):
        await self.start(model, registry_name, queue, files, simulate, served_as)
        _budget.frames_of = lambda request: math.ceil(request.audio_duration * self.engine.latents_per_second)

    async def encode(self, request: ConditionRequest, company: int = 1) -> tuple[ConditionResult, dict]:
        """The job's conditions, and its stamps for the timeline."""
        result, stamps = await self.one(self.encode_batch, request, company)
        self.observe_latency(stamps["finished"] - stamps["arrived"])
        return result, stamps

    @serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.02, batch_size_fn=_budget)
    async def encode_batch(self, requests: list[ConditionRequest]) -> list[tuple | ItemFailure]:
        metrics().stage_batch_size.observe(len(requests), tags={"stage": "condition"})
        start, started = time.perf_counter(), time.time()
        results = await self.guard.run_batch(self.engine.encode, requests)
        self.jobs_done += len(requests)
        logger.info("condition batch of %d in %.3f s, jobs %s", len(requests), time.perf_counter() - start,
                    [r.tag for r in requests])
        return stamped(results, started)
