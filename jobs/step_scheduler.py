"""Which diffusion jobs run in the DiT's next forward pass: step-level scheduling (continuous batching of steps).

The DiT engine advances a list of sampling states by one step per call (`DiTEngine.step`). This scheduler decides,
before every step, which states go in:

- `scheduling: step` (default): a job that arrives while a batch is mid-denoising joins at the next step, with its
  own timestep; a job leaves at its own last step.
- `scheduling: request`: whole-request batching, for comparison: a batch forms while the stage is idle (for up to
  `batch_wait_timeout_s`), runs to its last step, and only then are waiting jobs admitted.

Jobs are admitted in arrival order while their forward pass stays within `max_batch_size` jobs and
`max_batch_frames` padded latent frames (rows x longest job, the work a padded forward does). A job bigger than the
budget runs alone rather than failing. Jobs with different `batch_key`s (step count, shift, guidance) run in
separate forward passes, one after the other, and so do jobs whose lengths differ by more than `max_padding` (the
engine masks padding, so results never depend on it; the padded frames only cost compute).

The engine runs in a worker thread; everything else runs on the replica's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)


class StepSchedulingConfig(BaseModel):
    """The DiT's `user_config` (retuned from `serve_config.yaml` without a redeploy)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, le=256, description="Jobs in one forward pass.")
    max_batch_frames: int = Field(8192, ge=1, description="Padded latent frames in one forward pass: rows (outputs, "
                                  "x2 with CFG) x the longest job's frames. 25 frames = 1 s of audio.")
    max_padding: float = Field(0.25, ge=0.0, le=100.0, description="Padding one forward pass may carry, as a "
                               "fraction of its real frames. Jobs further apart in length take separate forward "
                               "passes in the same step round (0: exact-length buckets).")
    batch_wait_timeout_s: float = Field(0.05, ge=0.0, le=10.0, description="An idle stage waits this long after the "
                                        "first job for others to batch with.")
    scheduling: Literal["step", "request"] = Field("step", description="`step`: jobs join and leave a running batch "
                                                   "at step boundaries. `request`: whole-request batches.")


@dataclass(eq=False)
class _Entry:
    request: Any
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    state: Any = None  # the engine's sampling state, once admitted
    canceled: bool = False
    # max_jobs_per_pass (the most jobs it shared a pass with), reports (progress reports that carried it), and the
    # wall-clock times it arrived, was admitted (started) and left (finished)
    record: dict[str, Any] = field(default_factory=dict)
    company: int = 1  # jobs the caller has on their way here; 0: none worth waiting for


# {job tag: (step, total)} -> tags to stop now (canceled or timed out jobs)
ProgressCallback = Callable[[dict[str, tuple[int, int]]], Awaitable["set[str] | list[str] | None"]]


class StepScheduler:
    """Runs `engine.step` over the admitted jobs until each reaches its last step; `submit` awaits one job's latents.

    `engine` needs `batch_key(request)`, `start(request)` (a state with `key`, `cost()`, `rows`, `frames`, `step`,
    `total`, `done`, `latents()`) and `step(states)`. `run_engine(fn, *args)` runs an engine call off the event loop
    (and counts failures); `on_progress` reports steps and answers which jobs to stop; `on_batch(jobs, seconds)` is
    told about every forward pass.
    """

    def __init__(self, engine: Any, config: StepSchedulingConfig,
                 run_engine: Callable[..., Awaitable[Any]] | None = None, on_progress: ProgressCallback | None = None,
                 on_batch: Callable[[int, float], None] | None = None):
        self.engine, self.config = engine, config
        self.run_engine = run_engine or (lambda fn, *args: asyncio.to_thread(fn, *args))
        self.on_progress, self.on_batch = on_progress, on_batch
        self.pending: deque[_Entry] = deque()
        self.active: list[_Entry] = []
        self.round_s: float | None = None  # seconds per step round (every forward pass of one step), smoothed
        self._wake = asyncio.Event()
        self._report: asyncio.Task | None = None
        self._task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def jobs(self) -> int:
        """Jobs in this stage now, waiting or running (what the autoscaler compares with its target)."""
        return len(self.pending) + len(self.active)

    def check(self) -> None:
        if self._task.done():
            raise RuntimeError(f"DiT scheduler stopped: {self._task.exception()!r}")

    async def submit(self, request: Any, record: dict[str, Any] | None = None, company: int = 1
                     ) -> np.ndarray | None:
        """The job's latents, or None when it was stopped before its last step. `record` (if given) receives
        `max_jobs_per_pass` (the most jobs this one shared a forward pass with, itself included), `reports` (the
        progress reports that carried it) and `arrived`, `started`, `finished` (wall clock). `company`: the jobs
        the caller has on their way here; with none, an idle stage starts this one without waiting for others."""
        entry = _Entry(request, asyncio.get_running_loop().create_future(), record=record if record is not None
                       else {}, company=company)
        entry.record.update(max_jobs_per_pass=0, reports=0, arrived=time.time())
        self.pending.append(entry)
        self._wake.set()
        try:
            return await asyncio.shield(entry.future)
        except asyncio.CancelledError:  # the caller went away: leave the batch at the next step
            entry.canceled = True
            raise

    # -- the loop ------------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self.active:
                while not self.pending:
                    self._wake.clear()
                    await self._wake.wait()
                if self.pending[0].company > 0:
                    await self._wait_for_company()
            await self._admit()
            groups: dict[tuple, list[_Entry]] = {}
            for entry in self.active:
                groups.setdefault(entry.state.key, []).append(entry)
            start = time.perf_counter()
            for group in groups.values():
                for forward in self._by_length(group):
                    # A stop that arrived during an earlier pass of this round applies to this one already.
                    forward = [e for e in forward if not e.canceled]
                    if forward:
                        await self._step(forward)
            seconds = time.perf_counter() - start
            self.round_s = seconds if self.round_s is None else 0.7 * self.round_s + 0.3 * seconds
            self._progress({e.request.tag: (e.state.step, e.state.total) for e in self.active if not e.canceled})
            self._retire()

    async def _wait_for_company(self) -> None:
        """An idle stage holds the first job up to `batch_wait_timeout_s`, or until a batch's worth is waiting."""
        deadline = self.pending[0].arrived + self.config.batch_wait_timeout_s
        while len(self.pending) < self.config.max_batch_size and time.monotonic() < deadline:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break

    async def _admit(self) -> None:
        if self.config.scheduling == "request" and self.active:
            return
        while self.pending:
            entry = self.pending[0]
            if entry.canceled:
                self.pending.popleft()
                continue
            if entry.state is None:
                try:
                    entry.state = await self.run_engine(self.engine.start, entry.request)
                except Exception as exc:
                    self.pending.popleft()
                    if not entry.future.done():
                        entry.future.set_exception(exc)
                    continue
            if not self._fits(entry.state):
                return  # first come, first served: nobody overtakes the head of the line
            self.pending.popleft()
            self.active.append(entry)
            entry.record["started"] = time.time()

    def _fits(self, state: Any) -> bool:
        group = [e.state for e in self.active if e.state.key == state.key]
        if not group:
            return True  # alone it always runs, even over the frame budget
        if len(group) + 1 > self.config.max_batch_size:
            return False
        rows = sum(s.rows for s in group) + state.rows
        return rows * max(state.frames, *(s.frames for s in group)) <= self.config.max_batch_frames

    def _by_length(self, group: list[_Entry]) -> list[list[_Entry]]:
        """Split a group into forward passes, longest jobs first, each within `max_padding` of its real work."""
        passes: list[list[_Entry]] = []
        real = padded = 0
        for entry in sorted(group, key=lambda e: -e.state.frames):
            rows, frames = entry.state.rows, entry.state.frames
            if passes:
                longest = passes[-1][0].state.frames
                if padded + rows * longest <= (1.0 + self.config.max_padding) * (real + rows * frames):
                    passes[-1].append(entry)
                    real, padded = real + rows * frames, padded + rows * longest
                    continue
            passes.append([entry])
            real = padded = rows * frames
        return passes

    async def _step(self, group: list[_Entry]) -> None:
        states = [e.state for e in group]
        start = time.perf_counter()
        try:
            await self.run_engine(self._step_and_collect, states)
        except Exception as exc:  # this forward failed: so do its jobs (the guard counts the failure)
            for entry in group:
                entry.canceled = True
                if not entry.future.done():
                    entry.future.set_exception(exc)
            return
        seconds = time.perf_counter() - start
        for entry in group:
            entry.record["max_jobs_per_pass"] = max(entry.record["max_jobs_per_pass"], len(group))
        if self.on_batch:
            self.on_batch(len(group), seconds)

    def _step_and_collect(self, states: list[Any]) -> None:
        """On the engine thread: one step, then the latents of the jobs it finished (torch stays on that thread)."""
        self.engine.step(states)
        for state in states:
            if state.done:
                state.result = state.latents()

    def _progress(self, steps: dict[str, tuple[int, int]]) -> None:
        """Report a round's steps without waiting. The answer (tags to stop: canceled, timed out, superseded) stops
        those jobs as soon as it arrives, before the next forward pass whatever the round holds."""
        if self.on_progress is None or not steps:
            return
        if self._report is not None and not self._report.done():
            return  # the last report is still on its way; progress is advisory
        self._report = asyncio.get_running_loop().create_task(self.on_progress(steps))
        self._report.add_done_callback(self._apply_stops)
        for entry in self.active:
            if entry.request.tag in steps:
                entry.record["reports"] += 1

    def _apply_stops(self, report: asyncio.Task) -> None:
        if report.cancelled() or report.exception() is not None:
            return  # the registry unreachable: the driver's heartbeat and its cancel still stop the job
        stop = set(report.result() or ())
        for entry in (*self.active, *self.pending):
            if entry.request.tag in stop:
                entry.canceled = True

    def _retire(self) -> None:
        still = []
        for entry in self.active:
            if entry.future.done():
                continue
            if entry.canceled or entry.state.done:
                entry.record["finished"] = time.time()
            if entry.canceled:
                entry.future.set_result(None)
            elif entry.state.done:
                entry.future.set_result(entry.state.result)
            else:
                still.append(entry)
        self.active = still
