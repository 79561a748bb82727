"""Serve shim for stage 2 (`models.dit.DiTEngine`): step-level batching across jobs (`jobs.step_scheduler`), with
diffusion progress reported to the registry after every step."""

from __future__ import annotations

import logging

import numpy as np
from ray import serve

from deployments.stage import StageReplica
from jobs.config import FilesConfig, QueueConfig
from jobs.metrics import metrics
from jobs.step_scheduler import StepScheduler, StepSchedulingConfig
from models.dit import DiTEngine, DiTRequest
from models.loading import ModelConfig

logger = logging.getLogger(__name__)


# max_ongoing_requests bounds the jobs Serve routes here; keep it >= user_config.max_batch_size so batches can fill.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32, health_check_period_s=10)
class DiT(StageReplica):
    engine_class, stage = DiTEngine, "dit"

    async def __init__(self, model: ModelConfig, registry_name: str, queue: QueueConfig, files: FilesConfig,
                       simulate: dict | None = None, served_as: str | None = None):
        await self.start(model, registry_name, queue, files, simulate, served_as)
        self.scheduler = StepScheduler(self.engine, StepSchedulingConfig(), run_engine=self.guard.run,
                                       on_progress=self._on_progress, on_batch=self._on_batch)
        for work, seconds in await self.guard.run(self.engine.calibrate):  # the pass cost before the first job
            self.scheduler.costs.add(work, seconds)
        self.guard.busy_s = 0.0

    def reconfigure(self, user_config: dict) -> None:
        self.scheduler.config = StepSchedulingConfig.model_validate(self.take_fault(user_config))

    def slots(self) -> int:
        return self.scheduler.config.round_jobs

    def in_flight(self) -> int:
        return self.scheduler.jobs

    def model(self) -> dict | None:
        """`jobs.eta.DiTModel`'s fields: the measured pass cost and the overhead the split weighs a pass at, the
        round rules, the latent rate, and whether guidance doubles a job's rows. None before the first forward
        pass."""
        cost = self.scheduler.costs.model()
        if cost is None:
            return None
        return {"fixed_s": cost[0], "per_frame_s": cost[1], "overhead": self.scheduler.costs.overhead(),
                "config": self.scheduler.config.model_dump(),
                "frames_per_s": self.engine.latents_per_second, "cfg": not self.engine.is_turbo}

    async def generate(self, request: DiTRequest, company: int = 1) -> tuple[np.ndarray | None, dict]:
        """The job's latents `(outputs, frames, channels)`, or None if it was stopped (canceled, timed out,
        superseded); and its record: stamps (arrived, started, finished), the most jobs it shared a forward pass
        with (`max_jobs_per_pass`) and the progress reports that carried it (`reports`)."""
        record: dict = {}
        latents = await self.scheduler.submit(request, record, company)
        self.jobs_done += latents is not None
        logger.info("job %s: %s after the DiT (at most %d jobs per forward pass)", request.tag,
                    "latents" if latents is not None else "stopped", record["max_jobs_per_pass"])
        return latents, record

    def _on_batch(self, jobs: int, seconds: float) -> None:
        metrics().stage_batch_size.observe(jobs, tags={"stage": "dit"})
        metrics().dit_step_seconds.observe(seconds)

    async def _on_progress(self, steps: dict[str, tuple[int, int]]) -> list[str]:
        """Report the steps; the registry answers which of these jobs stopped (canceled, timed out, lease lost)."""
        return await self.registry.call("report_steps", steps) if steps else []

    def check_health(self) -> None:
        super().check_health()
        self.scheduler.check()
