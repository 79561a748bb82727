"""When will each waiting job start? A discrete-event simulation of the pipeline from its current state.

The registry leases a job when one of its `capacity` slots frees (a running job finishes). A leased job spends the
condition encoder's latency, then joins a DiT replica, where it runs as the DiT runs it: admitted to a step round
(up to `round_jobs`), each round split into forward passes by the scheduler's own rule (`jobs.step_scheduler`) and
costing the replica's measured pass cost (`fixed + per_frame x rows x longest frames` per pass); after its last step
it spends the AudioCodec's latency and frees its slot. Simulating that forward from the jobs running now, in lease
order, gives every waiting job its lease time, with the batch boundaries and the rounds' sizes included.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

from jobs.step_scheduler import StepSchedulingConfig, split_passes


@dataclass
class DiTModel:
    """What a DiT replica reported: its pass cost and how it forms rounds and passes."""

    fixed_s: float  # seconds a forward pass costs before it computes anything
    per_frame_s: float  # seconds per row x padded latent frame
    overhead: float | None = None  # what the DiT's split weighs a pass at (`PassCosts.overhead`; None: not yet)
    config: StepSchedulingConfig = field(default_factory=StepSchedulingConfig)
    frames_per_s: float = 25.0  # latent frames per second of audio
    cfg: bool = False  # guidance doubles a job's rows (base models; turbo models ignore it)

    def pass_seconds(self, rows: int, frames: int) -> float:
        return self.fixed_s + self.per_frame_s * rows * frames

    def round_seconds(self, jobs: list["SimJob"]) -> float:
        """One step round of these jobs, as the scheduler splits it (jobs of different batch keys: separate passes)."""
        seconds = 0.0
        for group in _by_key(jobs).values():
            passes = split_passes([_Entry(job) for job in group], self.config, self.overhead)
            seconds += sum(self.pass_seconds(sum(e.state.rows for e in p), p[0].state.frames) for p in passes)
        return seconds


@dataclass(eq=False)
class SimJob:
    job_id: str
    rows: int
    frames: int
    steps_left: int
    key: Any = None  # the DiT's batch key (step count etc.): jobs with different keys never share a pass


class _Entry:  # what the scheduler's split functions read: `entry.state.rows`, `entry.state.frames`
    def __init__(self, job: SimJob):
        self.state = job


def _by_key(jobs: list[SimJob]) -> dict[Any, list[SimJob]]:
    groups: dict[Any, list[SimJob]] = {}
    for job in jobs:
        groups.setdefault(job.key, []).append(job)
    return groups


class _Replica:
    def __init__(self) -> None:
        self.active: list[SimJob] = []
        self.pending: list[SimJob] = []
        self.busy = False

    @property
    def load(self) -> int:
        return len(self.active) + len(self.pending)


def lease_times(now: float, capacity: int, dit: DiTModel, replicas: int, condition_s: float, codec_s: float,
                running: list[tuple[str, float, SimJob]], waiting: list[SimJob], horizon: int = 100_000,
                codec_service_s: float | None = None, codec_replicas: int = 1) -> dict[str, float]:
    """The predicted lease time of each job in `waiting` (in lease order).

    After the DiT a job spends `codec_s` (the AudioCodec's latency), or, given `codec_service_s` (its busy seconds
    per job), waits for one of `codec_replicas` decoders, each taking one job at a time for that long: jobs that
    leave the DiT together then end one after another, as they do.

    `running`: the leased jobs as `(where, seconds, job)`: `where` is "before_dit" (it reaches the DiT in `seconds`),
    "dit" (in a DiT round, `job.steps_left` to go) or "after_dit" (it frees its slot in `seconds`). `horizon` bounds
    the events simulated (a safety net: the simulation ends when every waiting job has a lease time)."""
    events: list[tuple[float, int, str, Any]] = []
    order = itertools.count()
    pool = [_Replica() for _ in range(max(1, replicas))]
    config = dit.config

    def push(at: float, kind: str, payload: Any) -> None:
        heapq.heappush(events, (at, next(order), kind, payload))

    def start_round(replica: _Replica, at: float) -> None:
        while replica.pending and sum(j.key == replica.pending[0].key for j in replica.active) < config.round_jobs:
            replica.active.append(replica.pending.pop(0))
        if replica.active:
            replica.busy = True
            push(at + dit.round_seconds(replica.active), "round", replica)
        else:
            replica.busy = False

    free = capacity
    in_dit = [job for where, _, job in running if where == "dit"]
    for job in in_dit:  # spread as Serve's router does: the least loaded first
        min(pool, key=lambda r: r.load).pending.append(job)
    for where, seconds, job in running:
        free -= 1
        if where == "before_dit":
            push(now + seconds, "arrive", job)
        elif where == "after_dit":
            push(now + seconds, "finish", job)
    for replica in pool:
        start_round(replica, now)

    starts: dict[str, float] = {}
    line = list(waiting)
    decoders = [now] * max(1, codec_replicas)  # when each decoder is free

    def decode(at: float, job: SimJob) -> None:
        if codec_service_s is None:
            push(at + codec_s, "finish", job)
            return
        start = max(at, heapq.heappop(decoders))
        heapq.heappush(decoders, start + codec_service_s)
        push(start + codec_service_s, "finish", job)

    def lease(at: float) -> None:
        nonlocal free
        while free > 0 and line:
            job = line.pop(0)
            starts[job.job_id] = at
            free -= 1
            push(at + condition_s, "arrive", job)

    lease(now)
    for _ in range(horizon):
        if not line or not events:
            break
        at, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            replica = min(pool, key=lambda r: r.load)
            replica.pending.append(payload)
            if not replica.busy:  # an idle DiT waits `batch_wait_timeout_s` for company
                replica.busy = True
                push(at + config.batch_wait_timeout_s, "start", replica)
        elif kind == "start":
            start_round(payload, at)
        elif kind == "round":
            replica = payload
            for job in replica.active:
                job.steps_left -= 1
                if job.steps_left <= 0:
                    decode(at, job)
            replica.active = [job for job in replica.active if job.steps_left > 0]
            start_round(replica, at)
        else:  # finish: its slot goes to the next in line
            free += 1
            lease(at)
    return starts
