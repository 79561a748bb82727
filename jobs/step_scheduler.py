"""Which diffusion jobs run in the DiT's next forward pass: step-level scheduling (continuous batching of steps).

The DiT engine advances a list of sampling states by one step per call (`DiTEngine.step`). This scheduler decides,
before every step, which states go in:

- `scheduling: step` (default): a job that arrives while a batch is mid-denoising joins at the next step, with its
  own timestep; a job leaves at its own last step.
- `scheduling: request`: whole-request batching, for comparison: a batch forms while the stage is idle (for up to
  `batch_wait_timeout_s`), runs to its last step, and only then are waiting jobs admitted.

Jobs are admitted in arrival order up to `max_round_jobs` per step round. A round runs as one or more forward passes,
each within `max_batch_size` jobs and `max_batch_frames` padded latent frames (rows x longest job, the work a padded
forward does); a job bigger than the budget runs alone rather than failing. Jobs with different `batch_key`s (step
count, shift, guidance) always take separate passes. Within a key, `split` decides how jobs of different lengths
share passes (the engine masks padding, so results never depend on it; padded frames only cost compute):

- `cost` (default): the split that costs least by the pass costs this replica measured, `seconds = fixed + per_frame
  x padded work`, fitted over its recent passes: padding is carried where it is cheaper than another pass. Until
  passes of different sizes have been measured, as `padding`.
- `padding`: longest first, a pass takes the next job while its padding stays within `max_padding` of its real work.

A round holding more jobs than one pass (`max_round_jobs` > `max_batch_size`) lets jobs of similar length fill
passes together; it also shares the stage among more jobs, so each of them finishes later than with a round of one
pass.

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
    max_round_jobs: int | None = Field(None, ge=1, le=1024, description="Jobs in one step round, over its "
                                       "forward passes (default: 2 x max_batch_size). More than one pass's worth "
                                       "lets jobs of similar length share passes.")
    split: Literal["cost", "padding"] = Field("cost", description="How a round's jobs of different lengths share "
                                              "forward passes. `cost`: the cheapest split by the measured pass "
                                              "cost (fixed + per padded frame). `padding`: within `max_padding`.")
    max_padding: float = Field(0.25, ge=0.0, le=100.0, description="With `split: padding` (and with `cost` until "
                               "the pass cost is measured): padding one forward pass may carry, as a fraction of its "
                               "real frames (0: exact-length passes).")
    batch_wait_timeout_s: float = Field(0.05, ge=0.0, le=10.0, description="An idle stage waits this long after the "
                                        "first job for others to batch with.")
    scheduling: Literal["step", "request"] = Field("step", description="`step`: jobs join and leave a running batch "
                                                   "at step boundaries. `request`: whole-request batches.")

    @property
    def round_jobs(self) -> int:
        return self.max_round_jobs or 2 * self.max_batch_size


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
        self.costs = PassCosts()
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
            for group in groups.values():
                for forward in self._passes(group):
                    # A stop that arrived during an earlier pass of this round applies to this one already.
                    forward = [e for e in forward if not e.canceled]
                    if forward:
                        await self._step(forward)
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
        """Room in the round for this job: fewer than `round_jobs` of its batch key (the passes respect the budgets)."""
        return sum(e.state.key == state.key for e in self.active) < self.config.round_jobs

    def _passes(self, group: list[_Entry]) -> list[list[_Entry]]:
        return split_passes(group, self.config, self.costs.overhead())

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
        self.costs.add(sum(s.rows for s in states) * max(s.frames for s in states), seconds)
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


def split_passes(entries: list, config: StepSchedulingConfig, overhead: float | None) -> list[list]:
    """Split one batch key's jobs (anything with `.state.rows` and `.state.frames`) into forward passes, longest
    first: each pass within `max_batch_size` jobs and `max_batch_frames` padded frames (a job over the budget alone),
    the cheapest such split for a pass `overhead` (`split: cost`, once measured: `PassCosts.overhead`), else each
    pass within `max_padding`. The scheduler runs these passes; the ETA's simulation (`jobs.eta`) prices them."""
    entries = sorted(entries, key=lambda e: -e.state.frames)
    if config.split == "cost" and overhead is not None:
        return _cheapest(entries, config, overhead)
    return _padded(entries, config)


def _fits_pass(rows: int, frames: int, jobs: int, config: StepSchedulingConfig) -> bool:
    """A forward pass of `jobs` jobs, `rows` rows padded to `frames`, within the budgets (one job always is)."""
    return jobs == 1 or (jobs <= config.max_batch_size and rows * frames <= config.max_batch_frames)


def _padded(entries: list[_Entry], config: StepSchedulingConfig) -> list[list[_Entry]]:
    """Greedy, longest first: a pass takes the next job while it stays within the budgets and `max_padding`."""
    passes: list[list[_Entry]] = []
    real = padded = rows_in = 0
    for entry in entries:
        rows, frames = entry.state.rows, entry.state.frames
        if passes:
            longest = passes[-1][0].state.frames
            if _fits_pass(rows_in + rows, longest, len(passes[-1]) + 1, config) and \
                    padded + rows * longest <= (1.0 + config.max_padding) * (real + rows * frames):
                passes[-1].append(entry)
                real, padded, rows_in = real + rows * frames, padded + rows * longest, rows_in + rows
                continue
        passes.append([entry])
        real = padded = rows * frames
        rows_in = rows
    return passes


def _cheapest(entries: list[_Entry], config: StepSchedulingConfig, overhead: float) -> list[list[_Entry]]:
    """The split of `entries` (longest first) into consecutive passes within the budgets that minimises the modelled
    cost, sum over passes of `overhead + rows x longest frames` (dynamic programming over the split points)."""
    n = len(entries)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        rows = 0
        for start in range(end - 1, -1, -1):  # the pass entries[start:end]; its longest is entries[start]
            rows += entries[start].state.rows
            frames = entries[start].state.frames
            if not _fits_pass(rows, frames, end - start, config):
                break  # a longer pass only grows (more jobs, more rows, a longer longest)
            cost = best[start] + overhead + rows * frames
            if cost <= best[end]:  # on a tie, the longer pass: fewer passes
                best[end], cut[end] = cost, start
    passes, end = [], n
    while end:
        passes.append(entries[cut[end]:end])
        end = cut[end]
    return passes[::-1]


class PassCosts:
    """The DiT's forward pass cost as measured here: seconds against padded work (rows x longest frames), fitted by
    least squares over the last `size` passes as `seconds = fixed + per_frame x work`."""

    MIN_PASSES = 8

    def __init__(self, size: int = 256):
        self.passes: deque[tuple[int, float]] = deque(maxlen=size)
        self._fitted: tuple[float, float] | None | bool = False  # the last fit, False when a pass came since

    def add(self, work: int, seconds: float) -> None:
        self.passes.append((work, seconds))
        self._fitted = False

    def overhead(self) -> float | None:
        """`fixed / per_frame`: the padded work one more pass costs before it computes anything (what padding is worth
        carrying to save a pass). None until at least `MIN_PASSES` passes of clearly different sizes (the largest
        1.5x the smallest) give a positive slope."""
        fit = self._fit()
        return fit[0] / fit[1] if fit else None

    def model(self) -> tuple[float, float] | None:
        """`(fixed_s, per_frame_s)`: the fit, or before there is one, the passes' seconds per frame (all of it
        proportional); None before any pass."""
        if not self.passes:
            return None
        work, seconds = np.array(self.passes, dtype=np.float64).T
        return self._fit() or (0.0, float(seconds.sum() / max(1.0, work.sum())))

    def _fit(self) -> tuple[float, float] | None:
        """Fitted once per new pass (the scheduler asks every round, the load report every second)."""
        if self._fitted is False:
            self._fitted = None
            if len(self.passes) >= self.MIN_PASSES:
                work, seconds = np.array(self.passes, dtype=np.float64).T
                if work.max() >= 1.5 * work.min():
                    per_frame, fixed = np.polyfit(work, seconds, 1)
                    if per_frame > 0:
                        self._fitted = (max(0.0, float(fixed)), float(per_frame))
        return self._fitted
