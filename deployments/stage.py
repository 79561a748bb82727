"""What every stage shim shares: work-sized batching from `user_config`, a health record of its engine that counts
engine faults only (one request's bad input fails that request alone), a load report to the job registry (slots,
jobs in flight, busy seconds, finished jobs, latency) that also feeds the autoscaler the backlog, and the stamps of
each call (arrived, started, finished) that go into the job's timeline."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from deployments.logs import configure_replica_logging
from jobs.registry import RegistryClient

logger = logging.getLogger(__name__)

REPORT_INTERVAL_S = 1.0
LATENCY_SMOOTHING = 0.3  # weight of the newest call in the latency reported for the ETA


class BatchingConfig(BaseModel):
    """A stage's `@serve.batch` settings (retuned by `serve_config.yaml` without a redeploy)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(4, ge=1, le=256, description="Jobs per batch.")
    max_batch_frames: int = Field(16384, ge=1, description="Latent frames per batch, summed over its jobs' outputs "
                                  "(25 frames = 1 s of audio). A job over the budget runs alone.")
    batch_wait_timeout_s: float = Field(0.05, ge=0.0, le=10.0, description="Wait after the first request of a batch.")


class FrameBudget:
    """`batch_size_fn` for `@serve.batch`: a batch's size in latent frames, so `max_batch_size` becomes a frame budget.

    The size is `max(sum of frames, jobs x budget / max_jobs)`: over the budget when either the frames or the job
    count is. One job's frames count at most the whole budget, so a long job runs alone instead of failing. It never
    raises (ray#66140: one exception in a `batch_size_fn` hangs the batched method for good).
    """

    def __init__(self, frames_of: Callable[[Any], int]):
        self.frames_of = frames_of
        self.config = BatchingConfig()

    def __call__(self, items: list) -> int:
        budget, count = self.config.max_batch_frames, len(items)
        try:
            frames = sum(min(int(self.frames_of(item)), budget) for item in items)
        except Exception:  # an item we cannot size goes alone
            return budget if count <= 1 else budget + 1
        return max(frames, math.ceil(count * budget / self.config.max_batch_size))

    def apply(self, batched_method: Any, user_config: dict[str, Any] | None) -> BatchingConfig:
        """Validate `user_config` and push it into the `@serve.batch` method this budget sizes."""
        self.config = BatchingConfig.model_validate(user_config or {})
        batched_method.set_max_batch_size(self.config.max_batch_frames)
        batched_method.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        return self.config


class EngineGuard:
    """Runs engine calls on the stage's one engine thread, counts consecutive engine faults, and adds up busy seconds.

    One thread for every torch call of the replica (load, warm-up, batches): each new thread that enters an OpenMP
    parallel region gets its own team, and teams of different threads spin against each other. Measured on this
    2-core box: a DiT forward took 127 ms from a second thread against 62 ms from the first.

    A `ValueError` is the request's fault (its inputs), not the engine's: it is not counted. `max_consecutive_failures`
    other exceptions in a row mean the engine itself is broken (a lost CUDA context, say): `check_health` then raises
    and Serve replaces the replica. `fault` (the `fault_injection` key of a stage's `user_config`, for tests and
    drills) is a file path: while that file exists, every call fails as a broken engine's would.
    """

    def __init__(self, stage: str, threads: int | None = None, max_consecutive_failures: int = 3):
        self.stage, self.limit, self.failures = stage, max_consecutive_failures, 0
        self.busy_s = 0.0
        self.fault: str | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"{stage}-engine",
                                           initializer=_set_torch_threads if threads else None,
                                           initargs=(threads,) if threads else ())

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            if self.fault and os.path.exists(self.fault):
                raise RuntimeError(f"{self.stage} engine fault injected ({self.fault} exists)")
            result = await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except ValueError:
            logger.warning("%s engine call rejected its input", self.stage, exc_info=True)
            raise
        except Exception:
            self.failures += 1
            logger.exception("%s engine call failed (%d in a row)", self.stage, self.failures)
            raise
        finally:
            self.busy_s += time.perf_counter() - start
        self.failures = 0
        return result

    async def run_batch(self, fn: Callable[[list], list], items: list) -> list:
        """`fn(items)` in one call; if that fails, each item alone, so a failure stays with the items that cause
        it. Failed items come back as `ItemFailure`."""
        try:
            return await self.run(fn, items)
        except Exception as exc:
            if len(items) == 1:
                return [ItemFailure(exc)]
        results = []
        for item in items:
            try:
                results.extend(await self.run(fn, [item]))
            except Exception as exc:
                results.append(ItemFailure(exc))
        return results

    def check_health(self) -> None:
        if self.failures >= self.limit:
            raise RuntimeError(f"{self.stage} engine failed {self.failures} calls in a row")


def _set_torch_threads(threads: int) -> None:
    import torch  # only where threads are set: a simulated replica does not import torch at all

    torch.set_num_threads(threads)


@dataclass
class ItemFailure:
    """One batch item's exception, handed back in place of its result and raised to its caller alone."""

    error: Exception


def stamped(results: list, started: float) -> list:
    """A batch's results as `(result, started, finished)` (wall clock), failures as they are."""
    finished = time.time()
    return [r if isinstance(r, ItemFailure) else (r, started, finished) for r in results]


class StageReplica:
    """What the three stage deployments share: load the engine, warm it up, report health, load and readiness.

    A subclass sets `engine_class` and `stage`, calls `await self.start(model, registry_name, ...)` from its
    constructor, adds its batched method and counts `self.jobs_done` in it. A `@serve.batch` stage names that method
    (`batched`) and its `FrameBudget` (`budget`), which `reconfigure` and `slots` use; a stage that batches otherwise
    overrides both.
    """

    engine_class: type
    stage: str
    batched: str
    budget: FrameBudget

    async def start(self, model: Any, registry_name: str, queue: Any, files: Any,
                    simulate: dict | None = None, served_as: str | None = None) -> None:
        """`simulate` (a cost file, from `acestep-bench --simulate` only): an engine that sleeps the cost model's
        time instead of computing (`deployments.simulate`). `served_as`: the model name of a further model's stage,
        which reports to the registry as `<stage>:<name>` (the default model's as `<stage>`)."""
        configure_replica_logging()
        self.stage_key = self.stage if served_as is None else f"{self.stage}:{served_as}"
        self.guard = EngineGuard(self.stage, model.threads(self.stage) if hasattr(model, "threads") else None)
        if simulate is None:
            self.engine = await self.guard.run(self.engine_class, model)
        else:
            from deployments.simulate import simulated_engine

            self.engine = await self.guard.run(simulated_engine(self.stage), model, simulate)
        await self.guard.run(self.engine.warm_up)  # before Serve routes anything here
        self.guard.busy_s = 0.0
        self.jobs_done = 0
        self.calls_in_flight = 0
        self.latency_s: float | None = None  # what a call takes here now, smoothed (for the registry's ETA)
        self.backlog = 0  # jobs waiting in the registry, as of the last report
        self.replica_id = f"{self.stage_key}-{uuid.uuid4().hex[:8]}"
        self.registry = RegistryClient(registry_name, queue, files)
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    def reconfigure(self, user_config: dict) -> None:
        self.budget.apply(getattr(self, self.batched), self.take_fault(user_config))

    def take_fault(self, user_config: dict | None) -> dict:
        """`user_config` without its `fault_injection` key, which goes to the engine guard."""
        config = dict(user_config or {})
        self.guard.fault = config.pop("fault_injection", None)
        return config

    def slots(self) -> int:
        """Jobs this replica takes at once (what the registry dispatches against)."""
        return self.budget.config.max_batch_size

    def in_flight(self) -> int:
        """Jobs inside this replica now (what `/v1/stats` shows as `stages.<stage>.in_flight`)."""
        return self.calls_in_flight

    def latency(self) -> float | None:
        return self.latency_s

    def model(self) -> dict | None:
        """What the registry's ETA needs to know about how this stage runs jobs beyond its latency (the DiT's)."""
        return None

    def observe_latency(self, seconds: float) -> None:
        self.latency_s = seconds if self.latency_s is None else \
            (1 - LATENCY_SMOOTHING) * self.latency_s + LATENCY_SMOOTHING * seconds

    async def one(self, batched: Any, item: Any, company: int = 1) -> tuple[Any, dict[str, float]]:
        """Send one item through the `@serve.batch` method (which answers `stamped` results), counted in flight;
        its own failure is raised here. Returns the result and its stamps: arrived, started, finished.

        `company` is how many other jobs the caller has on their way here. With none, and nothing in this replica,
        the batch does not wait `batch_wait_timeout_s` for batch-mates that are not coming."""
        arrived = time.time()
        batched.set_batch_wait_timeout_s(self.budget.config.batch_wait_timeout_s
                                         if company > 0 or self.calls_in_flight else 0.0)
        self.calls_in_flight += 1
        try:
            result = await batched(item)
        finally:
            self.calls_in_flight -= 1
        if isinstance(result, ItemFailure):
            raise result.error
        value, started, finished = result
        return value, {"arrived": arrived, "started": started, "finished": finished}

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)  # first after Serve's reconfigure() has set the slots
            try:
                reply = await self.registry.call("report_stage", self.stage_key, self.replica_id, self.slots(),
                                                 self.guard.busy_s, self.jobs_done, self.in_flight(), self.latency(),
                                                 self.model())
                self.backlog = reply["backlog"]
            except Exception:  # the registry restarting: dispatch falls back to max_running_jobs meanwhile
                logger.warning("%s: load report to the registry failed", self.stage, exc_info=True)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The registry's backlog, for `deployments.autoscaling.backlog_policy` (Serve counts this stage's own
        requests itself)."""
        return {"backlog": float(self.backlog)}

    def check_health(self) -> None:
        self.guard.check_health()
        if self._reporter.done():
            raise RuntimeError(f"load reporter stopped: {self._reporter.exception()!r}")

    async def ready(self) -> bool:
        """Constructed means loaded and warmed up (Serve routes nothing to a replica before that)."""
        return True
