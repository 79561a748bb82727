"""Serve shim for stage 0 (`models.lm.LMEngine`): the 5 Hz language model, continuously batched across jobs.

Every call adds a job to the running batch; one loop writes one token for every job in it per engine step (prefills
of new jobs included), so jobs join and leave between tokens, each stopping on its own. Progress (tokens or codes
written, of how many) goes to the registry about twice a second; a job the registry says no longer runs (canceled,
timed out, lease lost), or whose caller canceled the call, leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from deployments.stage import StageReplica
from jobs.config import FilesConfig, QueueConfig
from jobs.metrics import metrics
from models.lm import LMConfig, LMEngine, LMRequest, LMResult, LMState

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5


class LMBatchingConfig(BaseModel):
    """The LanguageModel's `user_config` (retuned from `serve_config.yaml` without a redeploy)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1, le=256, description="Jobs writing tokens together; more wait to join.")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64, health_check_period_s=10)
class LanguageModel(StageReplica):
    engine_class, stage = LMEngine, "lm"

    async def __init__(self, config: LMConfig, registry_name: str, queue: QueueConfig, files: FilesConfig):
        await self.start(config, registry_name, queue, files)
        self.config = LMBatchingConfig()
        self.jobs: dict[LMState, tuple[asyncio.Future, dict]] = {}  # in arrival order: the first join first
        self.tracked: set[LMState] = set()  # the registry's jobs among them
        self.wake = asyncio.Event()
        self.reported = 0.0
        self.runner = asyncio.get_running_loop().create_task(self._run())

    def reconfigure(self, user_config: dict) -> None:
        self.config = LMBatchingConfig.model_validate(self.take_fault(user_config))

    def slots(self) -> int:
        return self.config.max_batch_size

    def in_flight(self) -> int:
        return len(self.jobs)

    async def generate(self, request: LMRequest, company: int = 1, job: bool = True) -> tuple[LMResult, dict]:
        """The job's plan (metadata, caption, lyrics, codes), and its stamps for the timeline. `job`: the request
        is an attempt of a registry job (its tag the attempt id), whose progress is reported; the ingress's own
        requests (`/format_input`, `/v1/create_sample`) are not."""
        stamps = {"arrived": time.time()}
        state = await self.guard.run(self.engine.start, request)  # a request the engine cannot run: ValueError
        if state.done:  # nothing to write (every field given)
            stamps["started"] = stamps["finished"] = time.time()
            return state.result, stamps
        done = asyncio.get_running_loop().create_future()
        self.jobs[state] = (done, stamps)
        if job:
            self.tracked.add(state)
        self.wake.set()
        try:
            result = await done
        finally:
            self.jobs.pop(state, None)  # canceled: it leaves the batch before the next step
            self.tracked.discard(state)
        self.observe_latency(stamps["finished"] - stamps["arrived"])
        return result, stamps

    async def _run(self) -> None:
        while True:
            if not self.jobs:
                self.wake.clear()
                await self.wake.wait()
                continue
            batch = list(self.jobs)[: self.config.max_batch_size]
            now = time.time()
            for state in batch:
                self.jobs[state][1].setdefault("started", now)
            try:
                await self.guard.run(self.engine.step, batch)
            except Exception as exc:  # the engine failed this step: its jobs fail, the loop goes on
                for state in batch:
                    if state in self.jobs and not self.jobs[state][0].done():
                        self.jobs[state][0].set_exception(exc)
                continue
            metrics().stage_batch_size.observe(len(batch), tags={"stage": "lm"})
            finished = time.time()
            for state in batch:
                entry = self.jobs.get(state)
                if entry is not None and state.done and not entry[0].done():
                    entry[1]["finished"] = finished
                    entry[0].set_result(state.result)
                    self.jobs_done += 1
            if finished - self.reported >= PROGRESS_INTERVAL_S:
                self.reported = finished
                await self._report()

    async def _report(self) -> None:
        """Each job's tokens (or, writing codes, codes) done and total to the registry; the jobs it says no longer
        run are dropped."""
        progress = {}
        for state in self.tracked:
            _, written, total = state.progress()
            progress[state.request.tag] = (written, total)
        try:
            stopped = set(await self.registry.call("report_steps", progress, "lm")) if progress else set()
        except Exception:  # the registry restarting: progress waits for the next report
            logger.warning("lm: progress report failed", exc_info=True)
            return
        for state in [s for s in self.tracked if s.request.tag in stopped]:
            done, _ = self.jobs[state]
            if not done.done():
                done.cancel()
                self.jobs.pop(state, None)
                logger.info("job %s: stopped in the LM (no longer runs)", state.request.tag)

    def check_health(self) -> None:
        super().check_health()
        if self.runner.done():
            raise RuntimeError(f"LM batch loop stopped: {self.runner.exception()!r}")
