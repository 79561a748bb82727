"""`JobRegistry`: the one Ray actor that owns every job's state.

Jobs wait in a FIFO queue and are leased to job drivers only while fewer than `max_running_jobs` run, so a queued
job's `queue_position` is its real place in line and `eta_seconds = queue_position * avg_job_seconds`. A driver keeps
its lease alive with heartbeats; a lease that lapses (the driver died) puts the job back at the head of the line, or
fails it after `max_attempts`, so no job waits forever. Status only moves forward:
queued -> running -> succeeded | failed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray

from jobs.config import QueueConfig
from jobs.metrics import metrics

logger = logging.getLogger(__name__)

NAMESPACE = "acestep"


@dataclass
class JobRecord:
    job_id: str
    spec: dict[str, Any]
    created_at: float
    upload_dir: str | None = None
    status: str = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    progress: dict[str, Any] | None = None
    attempts: int = 0
    driver_id: str | None = None
    lease_until: float = 0.0
    history: list[str] = field(default_factory=list)


class JobRegistry:
    """Plain class (usable without Ray in unit tests); `registry_actor()` runs it as a named async actor."""

    def __init__(self, config: QueueConfig):
        self.config = config
        self.jobs: dict[str, JobRecord] = {}
        self.queue: deque[str] = deque()  # never-started jobs, FIFO
        self.retry_queue: deque[str] = deque()  # started jobs whose lease lapsed, served first
        self.durations: deque[float] = deque(maxlen=config.avg_window)
        self.outcomes = {"succeeded": 0, "failed": 0}
        self._work = asyncio.Event()

    # -- clients -------------------------------------------------------------------------------------------------
    async def submit(self, job_id: str, spec: dict[str, Any], upload_dir: str | None = None) -> dict[str, Any]:
        """Enqueue, or refuse without keeping any record when the queue is full."""
        if len(self.queue) >= self.config.max_queued_jobs:
            metrics().jobs.inc(tags={"outcome": "rejected"})
            return {"accepted": False, "retry_after_s": max(1, round(self.avg_job_seconds()))}
        self.jobs[job_id] = JobRecord(job_id=job_id, spec=spec, created_at=time.time(), upload_dir=upload_dir)
        self.queue.append(job_id)
        metrics().queue_depth.set(len(self.queue))
        self._work.set()
        return {"accepted": True, "queue_position": len(self.queue)}

    async def view(self, job_id: str) -> dict[str, Any] | None:
        self._reap()
        job = self.jobs.get(job_id)
        if job is None:
            return None
        position = self._position(job_id)
        avg = self.avg_job_seconds()
        return {
            "job_id": job.job_id, "status": job.status, "created_at": job.created_at, "started_at": job.started_at,
            "finished_at": job.finished_at, "queue_position": position,
            "eta_seconds": position * avg if position > 0 else None, "avg_job_seconds": avg,
            "result": job.result, "error": job.error,
            "progress": job.progress or ({"stage": "queued", "step": 0, "total": 0} if job.status == "queued"
                                         else None),
        }

    async def stats(self) -> dict[str, Any]:
        self._reap()
        counts = {"queued": 0, "running": 0, "succeeded": 0, "failed": 0}
        for job in self.jobs.values():
            counts[job.status] += 1
        return {"jobs": {"total": len(self.jobs), **counts}, "queue_size": len(self.queue),
                "queue_maxsize": self.config.max_queued_jobs, "avg_job_seconds": self.avg_job_seconds()}

    def avg_job_seconds(self) -> float:
        return sum(self.durations) / len(self.durations) if self.durations else self.config.initial_avg_job_seconds

    def _position(self, job_id: str) -> int:
        if self.jobs[job_id].status != "queued":
            return 0
        return self.queue.index(job_id) + 1

    # -- drivers -------------------------------------------------------------------------------------------------
    async def lease(self, driver_id: str, max_jobs: int, wait_s: float = 1.0) -> list[dict[str, Any]]:
        """Up to `max_jobs` jobs for this driver (waiting up to `wait_s` for one), within `max_running_jobs`."""
        deadline = time.monotonic() + wait_s
        while True:
            self._reap()
            room = min(max_jobs, self.config.max_running_jobs - self._running_count())
            if room > 0 and (self.queue or self.retry_queue):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._work.clear()
            try:
                await asyncio.wait_for(self._work.wait(), timeout=min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass
        leased = []
        now = time.time()
        while room > 0 and (self.retry_queue or self.queue):
            job = self.jobs[(self.retry_queue or self.queue).popleft()]
            job.status, job.driver_id = "running", driver_id
            if job.started_at is None:
                job.started_at = now
                metrics().job_queue_seconds.observe(now - job.created_at)
            job.attempts += 1
            job.lease_until = time.monotonic() + self.config.lease_seconds
            job.progress = {"stage": "starting", "step": 0, "total": 0}
            leased.append({"job_id": job.job_id, "spec": job.spec, "attempt": job.attempts})
            room -= 1
        metrics().queue_depth.set(len(self.queue))
        return leased

    async def heartbeat(self, job_id: str, driver_id: str, progress: dict[str, Any] | None = None) -> bool:
        """Extend the lease. False tells the driver to stop: the job is no longer its to run."""
        job = self._owned(job_id, driver_id)
        if job is None:
            return False
        job.lease_until = time.monotonic() + self.config.lease_seconds
        if progress is not None:
            job.progress = progress
        return True

    async def report_steps(self, job_ids: list[str], step: int, total: int) -> None:
        """Diffusion progress from the DiT stage (no ownership: the stage does not hold leases)."""
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            if job is not None and job.status == "running":
                job.progress = {"stage": "diffusion", "step": step, "total": total}

    async def finish(self, job_id: str, driver_id: str, result: dict[str, Any]) -> bool:
        job = self._owned(job_id, driver_id)
        if job is None:
            return False
        job.result = result
        self._end(job, "succeeded")
        return True

    async def fail(self, job_id: str, driver_id: str, error: str, retry: bool = False) -> bool:
        """Fail the job, or (`retry`, attempts left) put it back at the head of the line."""
        job = self._owned(job_id, driver_id)
        if job is None:
            return False
        if retry and job.attempts < self.config.max_attempts:
            self._requeue(job, error)
        else:
            job.error = error
            self._end(job, "failed")
        return True

    # -- internals -----------------------------------------------------------------------------------------------
    def _owned(self, job_id: str, driver_id: str) -> JobRecord | None:
        job = self.jobs.get(job_id)
        if job is None or job.status != "running" or job.driver_id != driver_id:
            return None
        return job

    def _running_count(self) -> int:
        return sum(1 for job in self.jobs.values() if job.status == "running" and job.driver_id is not None)

    def _requeue(self, job: JobRecord, reason: str) -> None:
        logger.warning("job %s attempt %d lost (%s); retrying", job.job_id, job.attempts, reason)
        job.history.append(reason)
        job.driver_id = None
        job.progress = {"stage": "retry_wait", "step": 0, "total": 0}
        self.retry_queue.append(job.job_id)
        self._work.set()

    def _reap(self) -> None:
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.status == "running" and job.driver_id is not None and job.lease_until < now:
                reason = f"job driver {job.driver_id} stopped responding"
                if job.attempts < self.config.max_attempts:
                    self._requeue(job, reason)
                else:
                    job.error = f"{reason} on attempt {job.attempts} of {self.config.max_attempts}; giving up"
                    self._end(job, "failed")

    def _end(self, job: JobRecord, status: str) -> None:
        job.status, job.finished_at, job.driver_id = status, time.time(), None
        job.progress = {"stage": "done", "step": 0, "total": 0}
        self.outcomes[status] += 1
        metrics().jobs.inc(tags={"outcome": status})
        if job.started_at is not None:
            self.durations.append(job.finished_at - job.started_at)
            metrics().job_seconds.observe(job.finished_at - job.started_at)
        if job.upload_dir:  # uploads live only as long as their job
            shutil.rmtree(job.upload_dir, ignore_errors=True)
        self._work.set()  # a slot is free
        logger.info("job %s %s after %.2f s (attempts %d)%s", job.job_id, status,
                    job.finished_at - job.created_at, job.attempts, f": {job.error}" if job.error else "")


def registry_actor(name: str, config: QueueConfig) -> "ray.actor.ActorHandle":
    """Get or create the app's named registry actor (detached: it outlives any one replica)."""
    actor_cls = ray.remote(JobRegistry)
    return actor_cls.options(name=f"registry-{name}", namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                             num_cpus=0, max_restarts=-1, max_concurrency=1000).remote(config)

