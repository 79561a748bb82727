"""`JobRegistry`: the one Ray actor that owns every job's state.

Jobs wait in a FIFO queue and are leased to job drivers only while the pipeline has room for them: the DiT and
AudioCodec replicas report their job slots (and their measured seconds per job and latency) here every second, and
no more jobs run than those slots add up to (capped by `max_running_jobs`). So a queued job's `queue_position` is its
real place in line, and its `eta_seconds` comes from simulating the pipeline forward (`jobs.eta`): the running jobs
go through the DiT's step rounds as its scheduler forms them, at the pass cost it measured, and through the other
stages at their measured latencies; each freed slot goes to the next in line (see `eta_schedule`). A driver keeps its
leases alive with heartbeats; a lease that lapses (the driver died) puts the job back at the head of the line, or
fails it after `max_attempts`, so no job waits forever. Status only moves forward: queued -> running -> succeeded |
failed | canceled (and queued -> canceled); a job that ended is never leased again.

Each lease is one attempt, named `<job_id>#<n>` (`attempt_id`). Drivers and stages carry that id, and the registry
answers only the current attempt of a running job: reports, results and heartbeats of an older attempt are refused,
which tells its driver and stages to stop.

Every state change is journaled (SQLite) before the method that made it returns; the writes run on one writer
thread, in order, so reads (`view`, `stats`) never wait behind a disk write. A restarted registry reads the journal
back, and with it the configuration of the latest deploy. `view(job_id, wait_s)` long-polls: it answers when the
job's status, place in line, stage or step changes, or after `wait_s`. Finished jobs, their files and their
idempotency keys expire after `retention_s`. No call walks the jobs: running and leased jobs have their own index,
and what falls due (lease ends, deadlines, expiry of finished jobs) comes off time-ordered heaps, so a poll costs the
same with 10,000 retained jobs as with none; deletes in storage run off the actor's event loop.

A job submitted with a `webhook` gets its `start` (first lease) and `completed` (end) events POSTed by tasks on the
actor's event loop (`jobs.webhooks`); each pending delivery is kept in the job's journaled record until answered, so
a restarted registry sends it again (at least once).
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import json
import logging
import math
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray

from deployments.logs import configure_replica_logging
from jobs.config import FilesConfig, QueueConfig
from jobs.eta import DiTModel, SimJob, lease_times
from jobs.journal import Journal
from jobs.metrics import metrics
from jobs.step_scheduler import StepSchedulingConfig
from jobs.storage import ResultStore, UploadStore
from jobs.webhooks import WebhookSender, new_delivery

logger = logging.getLogger(__name__)

NAMESPACE = "acestep"
TERMINAL = ("succeeded", "failed", "canceled")
# Stages whose job slots bound dispatch: a job is in one of them for nearly all of its run.
SLOT_STAGES = ("dit", "codec")
STAGE_REPORT_TTL_S = 5.0  # a replica silent this long is gone (scaled down, or dead)
AVG_HORIZON_S = 120.0  # job-end intervals older than this no longer describe the pipeline
MAX_WAIT_S = 30.0  # longest long-poll
ETA_REFRESH_S = 0.5  # the simulated schedule is recomputed this often, and after a change, but then ...
ETA_DUTY = 0.1  # ... not before 10x its last computation's time has passed: at most 10 % of the registry's time
ETA_SIMULATED_JOBS = 500  # waiting jobs simulated one by one (~10 ms); those behind follow at the simulated rate
DEFAULT_STEPS = 8


@dataclass
class JobRecord:
    job_id: str
    spec: dict[str, Any]
    created_at: float
    upload_dir: str | None = None
    status: str = "queued"
    started_at: float | None = None
    leased_at: float | None = None  # the current attempt's lease
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0
    driver_id: str | None = None
    idempotency: tuple[str, str] | None = None  # (key, request fingerprint)
    history: list[str] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)  # pending deliveries (`jobs.webhooks.new_delivery`)
    # In memory only: progress is advisory and a lease is re-granted after a restart.
    progress: dict[str, Any] | None = field(default=None, metadata={"volatile": True})
    lease_until: float = field(default=0.0, metadata={"volatile": True})

    def durable(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("volatile")}

    @property
    def attempt_id(self) -> str:
        """`<job_id>#<n>`: what a driver and its stage calls carry for the n-th attempt of a job."""
        return f"{self.job_id}#{self.attempts}"


def split_attempt(attempt: str) -> tuple[str, int]:
    job_id, _, number = attempt.rpartition("#")
    return (job_id, int(number)) if job_id and number.isdigit() else (attempt, -1)


@dataclass
class StageLoad:
    """A stage replica's last report."""

    at: float  # time.monotonic() of the report
    slots: int  # jobs it takes at once
    busy_s: float  # cumulative seconds spent computing
    jobs_done: int  # cumulative jobs finished
    in_flight: int = 0  # jobs inside the replica now
    seconds_per_job: float | None = None  # smoothed busy seconds per finished job
    latency_s: float | None = None  # what one job spends in it now: a call (condition, codec), a step round (DiT)
    model: dict[str, Any] | None = None  # the DiT's pass cost and round rules (`jobs.eta.DiTModel`'s fields)


class JobRegistry:
    """Plain class (usable without Ray in unit tests); `registry_actor()` runs it as a named async actor."""

    def __init__(self, config: QueueConfig, files: FilesConfig | None = None, name: str = "acestep"):
        """Without `files` (unit tests) nothing touches the disk: no journal, no result files to expire."""
        configure_replica_logging()  # as an actor: our loggers at INFO into its worker log
        self.name = name
        self.config, self.files = config, files
        self.journal = Journal(files.journal_path, name) if files and files.journal_path else None
        if self.journal:  # a restarted actor gets its creation arguments: the latest deploy's config is journaled
            saved = self.journal.load_config()
            if saved:
                self.config, self.files = QueueConfig(**saved["queue"]), FilesConfig(**saved["files"])
                if self.files.journal_path != files.journal_path:
                    self.journal = Journal(self.files.journal_path, name) if self.files.journal_path else None
        self._open_stores()
        self.jobs: dict[str, JobRecord] = {}
        self.queue: deque[str] = deque()  # never-started jobs, FIFO
        self.retry_queue: deque[str] = deque()  # started jobs whose lease lapsed, served first
        self.running: set[str] = set()  # status "running": leased, or waiting in retry_queue
        self.leased: set[str] = set()  # running and held by a driver
        self.counts: Counter[str] = Counter()  # jobs by status
        # Heaps, so that no call walks the jobs: (finished_at, job_id) of finished jobs; (lease_until, job_id,
        # attempt) of every lease granted or extended (stale entries are skipped when they come up); (deadline,
        # job_id) of running jobs.
        self.expiry: list[tuple[float, str]] = []
        self.lease_ends: list[tuple[float, str, int]] = []
        self.deadlines: list[tuple[float, str]] = []
        self._deletes: set[asyncio.Task] = set()
        self.idempotency: dict[str, str] = {}  # key -> job id
        # Seconds between job ends while jobs waited: (time.monotonic() at the end, interval x DiT replicas then).
        self.intervals: deque[tuple[float, float]] = deque(maxlen=config.avg_window)
        self._last_end: tuple[float, bool] | None = None  # (when, whether jobs were waiting then)
        self.stages: dict[str, dict[str, StageLoad]] = {}  # stage -> replica -> its last report
        self.further_models: set[str] = set()  # the further models (not the default) jobs have asked for
        self.codec_s_per_job: float | None = None  # the AudioCodec's last measured busy seconds per job, kept
        # across its replicas' restarts: a new replica has measured nothing yet, and the ETA needs it from the start
        self._work = asyncio.Event()
        self._changed = asyncio.Event()  # set (and replaced) on every change a long-poll may be waiting for
        self._version = 0
        self._eta: tuple[int, float, float, dict[str, float]] | None = None  # version, when, cost, job -> start
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="journal")  # one thread: writes stay in order
        self._last_write: Future | None = None
        self.webhook_sender = WebhookSender(lambda: self.config.webhooks, self._webhook_done)
        self._recover()

    def _open_stores(self) -> None:
        files = self.files
        self.store = ResultStore(files.output_dir, files.storage_options) if files else None
        self.uploads = UploadStore(files.upload_dir, files.storage_options) if files else None

    async def configure(self, config: QueueConfig, files: FilesConfig | None = None) -> None:
        """The current deploy's config wins over what the registry (which outlives apps) was created with, also
        after the actor restarts: it is journaled, and a moved journal gets every job copied over."""
        if config.job_timeout_s != self.config.job_timeout_s:
            self.deadlines = [(self.jobs[j].started_at + config.job_timeout_s, j) for j in self.running]
            heapq.heapify(self.deadlines)
        self.config = config
        if files is not None and files != self.files:
            if files.journal_path != (self.files.journal_path if self.files else None):
                self.journal = Journal(files.journal_path, self.name) if files.journal_path else None
                for job in self.jobs.values():
                    self._save(job)
            self.files = files
            self._open_stores()
        if self.journal and self.files:
            self._write(self.journal.save_config, {"queue": self.config.model_dump(), "files": self.files.model_dump()})
        await self._durable()

    # -- clients -------------------------------------------------------------------------------------------------
    async def submit(self, job_id: str, spec: dict[str, Any], upload_dir: str | None = None,
                     idempotency: tuple[str, str] | None = None) -> dict[str, Any]:
        """Enqueue; or refuse without keeping any record when the queue is full.

        With an idempotency `(key, fingerprint)`: a known key with the same fingerprint answers with the existing job
        (`"duplicate": True`), with another fingerprint `{"conflict": job_id}`. A job id already known (the client
        retried a submit whose answer a registry restart lost) answers with that job: it is never queued twice.
        """
        self._sweep()
        if job_id in self.jobs:
            return self._existing(self.jobs[job_id])
        if idempotency is not None and idempotency[0] in self.idempotency:
            existing = self.jobs[self.idempotency[idempotency[0]]]
            if existing.idempotency[1] != idempotency[1]:
                return {"accepted": False, "conflict": existing.job_id}
            return self._existing(existing)
        if len(self.queue) >= self.config.max_queued_jobs:
            metrics().jobs.inc(tags={"outcome": "rejected"})
            return {"accepted": False, "retry_after_s": max(1, round(self.avg_job_seconds()))}
        job = JobRecord(job_id=job_id, spec=spec, created_at=time.time(), upload_dir=upload_dir,
                        idempotency=tuple(idempotency) if idempotency else None)
        self.jobs[job_id] = job
        self.counts["queued"] += 1
        if _model(job):
            self.further_models.add(_model(job))
        if idempotency is not None:
            self.idempotency[idempotency[0]] = job_id
        self.queue.append(job_id)
        self._save(job)
        metrics().queue_depth.set(len(self.queue))
        self._work.set()
        answer = {"accepted": True, "job_id": job_id, "status": "queued", "queue_position": len(self.queue)}
        await self._durable()  # a lease may take the job meanwhile: the answer is what the submit found
        return answer

    def _existing(self, job: JobRecord) -> dict[str, Any]:
        return {"accepted": True, "duplicate": True, "job_id": job.job_id, "status": job.status,
                "queue_position": self._position(job.job_id)}

    async def view(self, job_id: str, wait_s: float = 0.0, since: list | None = None) -> dict[str, Any] | None:
        """The job as clients see it. With `wait_s` > 0 (at most `MAX_WAIT_S`), a long-poll: answers as soon as its
        status, place in line, stage or step changes, or when `wait_s` has passed; a finished job at once. `since`:
        the change key (`_change_key`) of the view the caller has, so a change that landed between its calls is
        answered at once instead of waited past."""
        self._reap()
        job = self.jobs.get(job_id)
        if job is None:
            return None
        view = self._view(job)
        seen = _change_key(view) if since is None else tuple(since)
        if seen != _change_key(view):
            return view
        deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S)
        while job.status not in TERMINAL and (remaining := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
            self._reap()
            view = self._view(job)
            if _change_key(view) != seen:
                break
        return view

    async def views(self, job_ids: list[str]) -> list[dict[str, Any] | None]:
        """`view` of several jobs in one call, without waiting (upstream's `/query_result`); None for an unknown id."""
        self._reap()
        return [self._view(self.jobs[job_id]) if job_id in self.jobs else None for job_id in job_ids]

    def _view(self, job: JobRecord) -> dict[str, Any]:
        position = self._position(job.job_id)
        avg = self.avg_job_seconds()
        return {
            "job_id": job.job_id, "status": job.status, "created_at": job.created_at, "started_at": job.started_at,
            "finished_at": job.finished_at, "queue_position": position,
            "eta_seconds": self._eta_seconds(job, position, avg) if position > 0 else None, "avg_job_seconds": avg,
            "result": job.result, "error": job.error, "attempts": job.attempts,
            "progress": job.progress or ({"stage": "queued", "step": 0, "total": 0} if job.status == "queued"
                                         else {"stage": "done", "step": 0, "total": 0} if job.status in TERMINAL
                                         else None),
        }

    async def cancel(self, job_id: str) -> str | None:
        """Cancel a queued or running job (its driver learns at its next heartbeat, the DiT at its next step, and
        the driver cancels the stage call in flight). The status after, or None for an unknown job; a finished job
        keeps its status."""
        self._reap()
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job.status in ("queued", "running"):
            job.error = "canceled by the client"
            self._end(job, "canceled")
            await self._durable()
        return job.status

    async def stats(self) -> dict[str, Any]:
        self._reap()
        counts = {status: self.counts[status] for status in ("queued", "running", *TERMINAL)}
        return {"jobs": {"total": len(self.jobs), **counts}, "queue_size": len(self.queue),
                "queue_maxsize": self.config.max_queued_jobs, "avg_job_seconds": self.avg_job_seconds(),
                "running_capacity": self.capacity(),
                "stages": {stage: {"replicas": len(loads), "slots": sum(l.slots for l in loads),
                                   "in_flight": sum(l.in_flight for l in loads),
                                   "busy_s": sum(l.busy_s for l in loads),
                                   "seconds_per_job": self._stage_seconds_per_job(loads)}
                           for stage, loads in self._live_stages().items()}}

    def avg_job_seconds(self) -> float:
        """Effective seconds per job at the current parallelism: how often, in steady state, a running job finishes
        and frees a slot for the head of the queue.

        Two measured bounds, the slower wins: the slowest stage's seconds per job divided over its live replicas
        (stages report busy seconds per finished job, so batching gains are in it), and the mean time between job
        ends while jobs were waiting (each end then frees a slot that the head of the queue takes at once), rescaled
        from the DiT replicas of the time to the current ones; the last `avg_window` within `AVG_HORIZON_S`. The
        second sees what the first cannot: stages slowing each other down on shared hardware. Before either is
        measured: `initial_avg_job_seconds`.
        """
        bounds = [self._stage_seconds_per_job(loads) for loads in self._live_stages().values()]
        now = time.monotonic()
        recent = [interval for at, interval in self.intervals if now - at < AVG_HORIZON_S]
        if len(recent) >= 3:
            bounds.append(sum(recent) / len(recent) / self._replicas("dit"))
        bounds = [b for b in bounds if b]
        return max(bounds) if bounds else self.config.initial_avg_job_seconds

    def capacity(self) -> int:
        """Jobs allowed to run at once: the job slots the DiT and AudioCodec replicas reported, up to
        `max_running_jobs` (which alone applies until they report)."""
        slots = sum(load.slots for stage, loads in self._live_stages().items() if _base(stage) in SLOT_STAGES
                    for load in loads)
        return max(1, min(self.config.max_running_jobs, slots)) if slots else self.config.max_running_jobs

    def _model_capacity(self) -> dict[str | None, int]:
        """Jobs each model may have running at once, for the models whose DiT replicas report: its DiT's slots and
        the AudioCodec's (which all models share). A model's jobs never take another's DiT slots, so a backlog for
        one does not hold back the rest."""
        live = self._live_stages()
        codec = sum(load.slots for load in live.get("codec", []))
        return {_model_of_stage(stage): sum(load.slots for load in loads) + codec for stage, loads in live.items()
                if _base(stage) == "dit"}

    async def report_stage(self, stage: str, replica: str, slots: int, busy_s: float, jobs_done: int,
                           in_flight: int = 0, latency_s: float | None = None, model: dict | None = None) -> dict:
        """A stage replica's heartbeat: its job slots, the jobs inside it now, its cumulative busy seconds and
        finished jobs, the latency one job sees in it now and (the DiT) its pass cost and round rules, for the ETA.
        Answers the backlog (jobs waiting in the registry), which the replica hands to the autoscaler."""
        loads = self.stages.setdefault(stage, {})
        previous = loads.get(replica)
        load = StageLoad(at=time.monotonic(), slots=slots, busy_s=busy_s, jobs_done=jobs_done, in_flight=in_flight,
                         seconds_per_job=previous.seconds_per_job if previous else None,
                         latency_s=latency_s if latency_s is not None else previous.latency_s if previous else None,
                         model=model if model is not None else previous.model if previous else None)
        if previous and jobs_done > previous.jobs_done:
            sample = (busy_s - previous.busy_s) / (jobs_done - previous.jobs_done)
            load.seconds_per_job = sample if load.seconds_per_job is None else \
                0.7 * load.seconds_per_job + 0.3 * sample
            if stage == "codec":
                self.codec_s_per_job = load.seconds_per_job
        loads[replica] = load
        self._work.set()  # the capacity may have grown
        return {"backlog": self._backlog(stage)}

    def _backlog(self, stage: str) -> int:
        """Jobs waiting for this stage: all of them for the AudioCodec, its model's for a model's own stage."""
        waiting = len(self.queue) + len(self.retry_queue)
        if _base(stage) == "codec" or not self.further_models:  # only the default model's jobs: no walk
            return waiting
        model = _model_of_stage(stage)
        return sum(1 for job_id in (*self.retry_queue, *self.queue) if _model(self.jobs.get(job_id)) == model)

    def _replicas(self, stage: str) -> int:
        return max(1, len(self._live_stages().get(stage, [])))

    def _live_stages(self) -> dict[str, list[StageLoad]]:
        now = time.monotonic()
        for loads in self.stages.values():
            for replica in [r for r, load in loads.items() if now - load.at > STAGE_REPORT_TTL_S]:
                del loads[replica]
        return {stage: list(loads.values()) for stage, loads in self.stages.items() if loads}

    @staticmethod
    def _stage_seconds_per_job(loads: list[StageLoad]) -> float | None:
        """One stage's seconds per job over all its replicas (a replica not yet measured counts as the mean)."""
        measured = [load.seconds_per_job for load in loads if load.seconds_per_job]
        if not measured:
            return None
        return sum(measured) / len(measured) / len(loads)

    def _position(self, job_id: str) -> int:
        if self.jobs[job_id].status != "queued":
            return 0
        return self.queue.index(job_id) + 1

    # -- ETA -----------------------------------------------------------------------------------------------------
    def _eta_seconds(self, job: JobRecord, position: int, avg: float) -> float:
        """Seconds until the job is leased: from the simulated schedule once the stages have reported latencies,
        before that `position x avg_job_seconds`."""
        now = time.time()
        version, at, cost, starts = self._eta or (-1, 0.0, 0.0, {})
        if now - at > ETA_REFRESH_S or (version != self._version and now - at > cost / ETA_DUTY):
            began = time.perf_counter()
            starts = self.eta_schedule(now)
            self._eta = (self._version, now, time.perf_counter() - began, starts)
        start = starts.get(job.job_id)
        return max(0.0, start - now) if start is not None else position * avg

    def eta_schedule(self, now: float) -> dict[str, float]:
        """Predicted lease time of every waiting job (wall clock), in the order they will be leased (retries first):
        the pipeline simulated forward from the running jobs' stages and steps (`jobs.eta.lease_times`), for each
        model apart (its own stages and its share of the slots; the AudioCodec is shared, and modelled as if each
        model had it alone). Empty until a DiT has reported its pass cost."""
        starts: dict[str, float] = {}
        capacity, per_model = self.capacity(), self._model_capacity()
        held = Counter(_model(self.jobs[job_id]) for job_id in self.leased)
        for stage, loads in self._live_stages().items():
            models = [load.model for load in loads if load.model]
            if _base(stage) == "dit" and models:
                model = _model_of_stage(stage)
                # its own slots, within what the other models' running jobs leave of the shared ones
                slots = max(1, min(per_model.get(model, capacity), capacity - (len(self.leased) - held[model])))
                starts.update(self._eta_of(now, model, models, slots))
        return starts

    def _eta_of(self, now: float, model: str | None, reports: list[dict], capacity: int) -> dict[str, float]:
        """`eta_schedule` for one model's jobs, from its DiT replicas' `reports`."""
        overheads = [m["overhead"] for m in reports if m.get("overhead") is not None]
        dit = DiTModel(fixed_s=sum(m["fixed_s"] for m in reports) / len(reports),
                       per_frame_s=sum(m["per_frame_s"] for m in reports) / len(reports),
                       overhead=sum(overheads) / len(overheads) if overheads else None,
                       config=StepSchedulingConfig.model_validate(reports[0]["config"]),
                       frames_per_s=reports[0]["frames_per_s"], cfg=reports[0]["cfg"])
        condition_s = self._latency("condition" if model is None else f"condition:{model}") or 0.0
        codec_s = self._latency("codec") or 0.0
        running = []
        for job_id in self.leased:
            job = self.jobs[job_id]
            if _model(job) != model:
                continue
            progress = job.progress or {}
            sim = _sim_job(job, dit, self.config.default_duration_s)
            if progress.get("stage") == "diffusion":
                sim.steps_left = max(1, (progress.get("total") or sim.steps_left) - progress.get("step", 0))
                running.append(("dit", 0.0, sim))
            elif progress.get("stage") == "decode":
                running.append(("after_dit", codec_s / 2, sim))
            else:  # starting, encode_audio, condition
                running.append(("before_dit", max(0.0, condition_s - (now - (job.leased_at or now))), sim))
        waiting, seen = [], set()
        for job_id in (*self.retry_queue, *self.queue):
            job = self.jobs[job_id]
            if job.status in ("queued", "running") and job_id not in seen and _model(job) == model:
                seen.add(job_id)
                waiting.append(_sim_job(job, dit, self.config.default_duration_s))
        codecs = self._live_stages().get("codec", [])
        starts = lease_times(now, capacity, dit, len(reports), condition_s, codec_s, running,
                             waiting[:ETA_SIMULATED_JOBS], codec_service_s=self.codec_s_per_job,
                             codec_replicas=len(codecs))
        times = sorted(starts.values())
        if len(waiting) > len(times) > 1:
            interval = (times[-1] - times[0]) / (len(times) - 1)
            for k, job in enumerate(waiting[len(times):], 1):
                starts[job.job_id] = times[-1] + k * interval
        return starts

    def _latency(self, stage: str) -> float | None:
        values = [load.latency_s for load in self._live_stages().get(stage, []) if load.latency_s]
        return sum(values) / len(values) if values else None

    # -- drivers -------------------------------------------------------------------------------------------------
    async def lease(self, driver_id: str, max_jobs: int, wait_s: float = 1.0) -> list[dict[str, Any]]:
        """Up to `max_jobs` jobs for this driver (waiting up to `wait_s` for one), within `max_running_jobs`.

        Each is `{"job_id", "spec", "attempt", "attempt_id"}`; only jobs still waiting are handed out."""
        deadline = time.monotonic() + wait_s
        while True:
            self._reap()
            room = min(max_jobs, self.capacity() - len(self.leased))
            leased = self._take(driver_id, room) if room > 0 and (self.queue or self.retry_queue) else []
            if leased:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._work.clear()
            try:
                await asyncio.wait_for(self._work.wait(), timeout=min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass
        metrics().queue_depth.set(len(self.queue))
        self._notify()  # every queued job moved up
        await self._durable()
        return leased

    def _take(self, driver_id: str, room: int) -> list[dict[str, Any]]:
        """Up to `room` jobs off the queues (retries first), in order; a job whose model has no room left is passed
        over and keeps its place."""
        rooms = self._model_capacity()
        if rooms:
            held = Counter(_model(self.jobs[job_id]) for job_id in self.leased)
            rooms = {model: cap - held[model] for model, cap in rooms.items()}
        leased = []
        now = time.time()
        for queue in (self.retry_queue, self.queue):
            passed = []
            while room > 0 and queue:
                job_id = queue.popleft()
                job = self.jobs[job_id]
                if job.status not in ("queued", "running") or job.driver_id is not None:
                    continue  # ended, or leased, while it was in line: never handed out again
                model = _model(job)
                if rooms.get(model, 1) <= 0:
                    passed.append(job_id)
                    continue
                if model in rooms:
                    rooms[model] -= 1
                leased.append(self._grant(job, driver_id, now))
                room -= 1
            queue.extendleft(reversed(passed))
        return leased

    def _grant(self, job: JobRecord, driver_id: str, now: float) -> dict[str, Any]:
        """Lease the job to the driver: its attempt starts."""
        if job.status == "queued":
            self._set_status(job, "running")
            job.started_at = now
            heapq.heappush(self.deadlines, (now + self.config.job_timeout_s, job.job_id))
            metrics().job_queue_seconds.observe(now - job.created_at)
        job.driver_id, job.leased_at = driver_id, now
        self.leased.add(job.job_id)
        job.attempts += 1
        self._extend_lease(job)
        job.progress = {"stage": "starting", "step": 0, "total": 0}
        if job.attempts == 1:  # first leased: a retried attempt is no new start
            self._webhook(job, "start")
        self._save(job)
        return {"job_id": job.job_id, "spec": job.spec, "attempt": job.attempts, "attempt_id": job.attempt_id}

    async def heartbeat(self, attempt: str, driver_id: str, progress: dict[str, Any] | None = None) -> bool:
        """Extend the lease of an attempt. False tells the driver to stop: the attempt is no longer its to run."""
        return not await self.heartbeats(driver_id, {attempt: progress})

    async def heartbeats(self, driver_id: str, attempts: dict[str, dict[str, Any] | None]) -> list[str]:
        """One driver's heartbeat for all its attempts, `{attempt_id: progress or None}` (None: keep the progress
        the DiT reports): extends their leases. Answers the attempts that are no longer the driver's to run."""
        self._reap()
        lost = []
        for attempt, progress in attempts.items():
            job = self._owned(attempt, driver_id)
            if job is None:
                lost.append(attempt)
                continue
            self._extend_lease(job)
            if progress is not None and progress != job.progress:
                job.progress = progress
                self._notify()
        return lost

    async def report_steps(self, steps: dict[str, tuple[int, int]], stage: str = "diffusion") -> list[str]:
        """Progress from a stage that runs jobs step by step, `{attempt_id: (step, total)}`: the DiT's diffusion
        steps, the LM's tokens (`stage` "lm"). Answers which of these attempts no longer run (canceled, timed out,
        lease lost, superseded by a later attempt), so the stage drops them."""
        self._reap()
        stopped = []
        for attempt, (step, total) in steps.items():
            job = self._current(attempt)
            if job is None or job.driver_id is None:
                stopped.append(attempt)
            else:
                job.progress = {"stage": stage, "step": step, "total": total}
        if len(stopped) < len(steps):
            self._notify()
        return stopped

    async def finish(self, attempt: str, driver_id: str, result: dict[str, Any]) -> bool:
        """The attempt's result; its `timeline` gets the registry's times (submitted, leased, finished)."""
        job = self._owned(attempt, driver_id)
        if job is None:
            return False
        now = time.time()
        timeline = result.get("timeline") or {}
        job.result = {**result, "timeline": {"submitted": job.created_at, "leased": job.leased_at, **timeline,
                                             "finished": now}}
        self._end(job, "succeeded", now)
        await self._durable()
        return True

    async def fail(self, attempt: str, driver_id: str, error: str, retry: bool = False) -> bool:
        """Fail the job, or (`retry`, attempts left) put it back at the head of the line."""
        job = self._owned(attempt, driver_id)
        if job is None:
            return False
        if retry and job.attempts < self.config.max_attempts:
            self._requeue(job, error)
        else:
            job.error = error
            self._end(job, "failed")
        await self._durable()
        return True

    # -- internals -----------------------------------------------------------------------------------------------
    def _current(self, attempt: str) -> JobRecord | None:
        """The running job whose current attempt this is."""
        job_id, number = split_attempt(attempt)
        job = self.jobs.get(job_id)
        if job is None or job.status != "running" or job.attempts != number:
            return None
        return job

    def _owned(self, attempt: str, driver_id: str) -> JobRecord | None:
        job = self._current(attempt)
        return job if job is not None and job.driver_id == driver_id else None

    def _extend_lease(self, job: JobRecord) -> None:
        job.lease_until = time.monotonic() + self.config.lease_seconds
        heapq.heappush(self.lease_ends, (job.lease_until, job.job_id, job.attempts))

    def _set_status(self, job: JobRecord, status: str) -> None:
        """Every status change goes through here, so the running index and the counts stay exact."""
        self.counts[job.status] -= 1
        self.counts[status] += 1
        job.status = status
        self._notify()
        if status == "running":
            self.running.add(job.job_id)
        else:
            self.running.discard(job.job_id)
            self.leased.discard(job.job_id)

    def _requeue(self, job: JobRecord, reason: str) -> None:
        logger.warning("job %s attempt %d lost (%s); retrying", job.job_id, job.attempts, reason)
        job.history.append(reason)
        job.driver_id = None
        self.leased.discard(job.job_id)
        job.progress = {"stage": "retry_wait", "step": 0, "total": 0}
        self.retry_queue.append(job.job_id)
        self._save(job)
        self._notify()
        self._work.set()

    def _reap(self) -> None:
        """Jobs past their deadline fail, lapsed leases are retried (or failed), expired jobs go. Only what is due
        comes off the heaps: no job is walked."""
        wall = time.time()
        if self.webhook_sender.backlog:  # recovered deliveries: the loop runs now
            self.webhook_sender.flush()
        while self.deadlines and self.deadlines[0][0] < wall:
            _, job_id = heapq.heappop(self.deadlines)
            job = self.jobs.get(job_id)
            if job is not None and job.status == "running":
                job.error = f"deadline exceeded: still running after {self.config.job_timeout_s:g} s"
                self._end(job, "failed")
        now = time.monotonic()
        while self.lease_ends and self.lease_ends[0][0] < now:
            _, job_id, attempt = heapq.heappop(self.lease_ends)
            job = self.jobs.get(job_id)
            if job is None or job_id not in self.leased or job.attempts != attempt or job.lease_until >= now:
                continue  # ended, requeued, re-leased or extended since this entry
            reason = f"job driver {job.driver_id} stopped responding"
            if job.attempts < self.config.max_attempts:
                self._requeue(job, reason)
            else:
                job.error = f"{reason} on attempt {job.attempts} of {self.config.max_attempts}; giving up"
                self._end(job, "failed")
        self._sweep()

    def _sweep(self) -> None:
        """Forget finished jobs older than `retention_s`, oldest first from the expiry heap, with their files
        (deleted off the event loop)."""
        horizon = time.time() - self.config.retention_s
        expired = []
        while self.expiry and self.expiry[0][0] < horizon:
            _, job_id = heapq.heappop(self.expiry)
            job = self.jobs.pop(job_id, None)
            if job is None:
                continue
            self.counts[job.status] -= 1
            if job.idempotency:
                self.idempotency.pop(job.idempotency[0], None)
            if self.journal:
                self._write(self.journal.delete, job.job_id)
            expired.append(job_id)
        if expired and self.store:
            self._off_loop(self._delete_results, expired)

    def _delete_results(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self.store.delete_job(job_id)

    def _off_loop(self, fn, *args) -> None:
        """Storage I/O (an object store round trip each) in a thread, never on the actor's event loop."""
        try:
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(fn, *args))
        except RuntimeError:  # no loop (recovery in the constructor): nothing waits on this actor yet
            fn(*args)
            return
        self._deletes.add(task)
        task.add_done_callback(self._deletes.discard)

    def _end(self, job: JobRecord, status: str, at: float | None = None) -> None:
        was_queued = job.status == "queued"
        self._set_status(job, status)
        job.finished_at, job.driver_id = at or time.time(), None
        job.progress = {"stage": "done", "step": 0, "total": 0}
        if was_queued:
            self.queue.remove(job.job_id)
            metrics().queue_depth.set(len(self.queue))
        elif job.job_id in self.retry_queue:
            self.retry_queue.remove(job.job_id)
        heapq.heappush(self.expiry, (job.finished_at, job.job_id))
        metrics().jobs.inc(tags={"outcome": status})
        if job.started_at is not None:
            metrics().job_seconds.observe(job.finished_at - job.started_at)
            now = time.monotonic()
            if self._last_end is not None and self._last_end[1]:
                self.intervals.append((now, (now - self._last_end[0]) * self._replicas("dit")))
            self._last_end = (now, bool(self.queue or self.retry_queue))
        if job.upload_dir and self.uploads:  # uploads live only as long as their job
            self._off_loop(self.uploads.delete_job, job.job_id)
        self._webhook(job, "completed")
        self._save(job)
        self._work.set()  # a slot is free
        logger.info("job %s %s after %.2f s (attempts %d)%s", job.job_id, status,
                    job.finished_at - job.created_at, job.attempts, f": {job.error}" if job.error else "")

    def _webhook(self, job: JobRecord, event: str) -> None:
        """Record the event's delivery in the job (saved with it by the caller), and start sending it."""
        request = (job.spec or {}).get("request") or {}
        if request.get("webhook") and event in request.get("webhook_events", ()):
            delivery = new_delivery(event, self._view(job))
            job.webhooks.append(delivery)
            self.webhook_sender.schedule(job.job_id, request["webhook"], delivery)

    def _webhook_done(self, job_id: str, delivery_id: str, outcome: str) -> None:
        """A delivery ended (delivered, or dropped): it leaves the job's record."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        job.webhooks = [d for d in job.webhooks if d["id"] != delivery_id]
        self._save(job)
        logger.info("webhook delivery %s of job %s: %s", delivery_id, job_id, outcome)

    def _save(self, job: JobRecord) -> None:
        if self.journal:  # serialized here: the record may change again before the writer thread gets to it
            self._write(self.journal.save, job.job_id, json.dumps(job.durable()))

    def _write(self, fn, *args) -> None:
        """A journal write, on the writer thread (in order); `_durable` waits for it."""
        self._last_write = self._writer.submit(fn, *args)

    async def _durable(self) -> None:
        """Wait until every journal write made so far is on disk (the one writer thread keeps them in order), so a
        change is journaled before the method that made it answers. Reads never wait here."""
        if self._last_write is not None and not self._last_write.done():
            await asyncio.wrap_future(self._last_write)
        elif self._last_write is not None:
            self._last_write.result()  # raise a failed write

    def _notify(self) -> None:
        """Wake the long-polls (each checks whether its own job changed) and invalidate the ETA schedule."""
        self._version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def _recover(self) -> None:
        """Rebuild the state from the journal: queues in submit order; running jobs get a fresh lease, so a driver
        that is still alive keeps its job and one that died loses it when the lease lapses."""
        if not self.journal:
            return
        records = sorted(self.journal.load(), key=lambda r: r["created_at"])
        lease_until = time.monotonic() + self.config.lease_seconds
        for row in records:
            job = JobRecord(**{**row, "idempotency": tuple(row["idempotency"]) if row["idempotency"] else None})
            self.jobs[job.job_id] = job
            self.counts[job.status] += 1
            if _model(job):
                self.further_models.add(_model(job))
            if job.idempotency:
                self.idempotency[job.idempotency[0]] = job.job_id
            if job.status == "queued":
                self.queue.append(job.job_id)
            elif job.status == "running":
                self.running.add(job.job_id)
                heapq.heappush(self.deadlines, ((job.started_at or job.created_at) + self.config.job_timeout_s,
                                                job.job_id))
                if job.driver_id is None:
                    self.retry_queue.append(job.job_id)
                    job.progress = {"stage": "retry_wait", "step": 0, "total": 0}
                else:
                    self.leased.add(job.job_id)
                    job.lease_until = lease_until
                    heapq.heappush(self.lease_ends, (lease_until, job.job_id, job.attempts))
            else:
                heapq.heappush(self.expiry, (job.finished_at or job.created_at, job.job_id))
            for delivery in job.webhooks:  # not yet answered before the restart: at least once
                self.webhook_sender.schedule(job.job_id, job.spec["request"]["webhook"], delivery)
        if records:
            logger.info("recovered %d jobs from %s (%d queued, %d running)", len(records), self.journal.path,
                        len(self.queue), len(self.running))


def _change_key(view: dict[str, Any]) -> tuple:
    """What a long-poll waits to change: status, place in line, stage and step, attempt."""
    progress = view["progress"] or {}
    return (view["status"], view["queue_position"], progress.get("stage"), progress.get("step"), view["attempts"])


def _model(job: JobRecord | None) -> str | None:
    """The further model a job runs on; None for the default model."""
    return ((job.spec or {}).get("model") if job else None) or None


def _base(stage: str) -> str:
    """`dit` of `dit:<model>`: the stage a registry key names."""
    return stage.partition(":")[0]


def _model_of_stage(stage: str) -> str | None:
    """The model a stage key belongs to: `<name>` of `dit:<name>`, None (the default model) of `dit`."""
    return stage.partition(":")[2] or None


def _steps(job: JobRecord) -> int:
    return int(((job.spec or {}).get("request") or {}).get("inference_steps") or DEFAULT_STEPS)


def _sim_job(job: JobRecord, dit: DiTModel, default_duration_s: float) -> SimJob:
    """A job as the ETA's simulation sees it: its DiT rows, latent frames, steps and batch key, from its request
    (the server's default duration where it gives none)."""
    request = (job.spec or {}).get("request") or {}
    guidance = request.get("guidance_scale", 7.0) if dit.cfg else 1.0
    rows = (request.get("batch_size") or 2) * (2 if guidance > 1.0 else 1)
    duration = request.get("audio_duration") or default_duration_s
    scale = request.get("lora_scale", 1.0)
    adapter = (request.get("lora"), scale) if request.get("lora") and scale != 0 else None  # `models.lora.lora_key`
    return SimJob(job.job_id, rows=rows, frames=math.ceil(duration * dit.frames_per_s), steps_left=_steps(job),
                  key=(_steps(job), request.get("shift"), guidance, request.get("cfg_interval_start"),
                       request.get("cfg_interval_end"), adapter))


def registry_actor(name: str, queue: QueueConfig, files: FilesConfig) -> "ray.actor.ActorHandle":
    """Get or create the app's named registry actor (detached: it outlives any one replica, and restarts)."""
    actor_cls = ray.remote(JobRegistry)
    # max_concurrency bounds the calls in progress at once, long-polls (`view(wait_s=...)`) included.
    return actor_cls.options(name=f"registry-{name}", namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                             num_cpus=0, max_restarts=-1, max_concurrency=10000).remote(queue, files, name)


class RegistryClient:
    """The registry actor, re-found by name when it was killed (a restart keeps the handle; a kill does not)."""

    def __init__(self, name: str, queue: QueueConfig, files: FilesConfig, attempts: int = 6):
        self._args = (name, queue, files)
        self._attempts = attempts
        self.actor = registry_actor(*self._args)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(self._attempts):
            try:
                return await getattr(self.actor, method).remote(*args, **kwargs)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if attempt == self._attempts - 1:
                    raise
                await asyncio.sleep(min(0.25 * 2**attempt, 2.0))
                self.actor = registry_actor(*self._args)
