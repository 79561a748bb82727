"""Prometheus metrics (through `ray.serve.metrics`, exported on Ray's metrics port), units in the names.

Queue time is kept apart from compute time: `acestep_job_queue_seconds` vs `acestep_stage_seconds`.
"""

from __future__ import annotations

from functools import cache

from ray.serve.metrics import Counter, Gauge, Histogram

_SECONDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]


class Metrics:
    def __init__(self) -> None:
        self.queue_depth = Gauge("acestep_queue_depth", description="Jobs waiting in the registry queue.")
        self.jobs = Counter("acestep_jobs_total", description="Jobs by outcome: succeeded, failed, rejected.",
                            tag_keys=("outcome",))
        self.job_queue_seconds = Histogram("acestep_job_queue_seconds", boundaries=_SECONDS,
                                           description="Seconds from submit to first dispatch.")
        self.job_seconds = Histogram("acestep_job_seconds", boundaries=_SECONDS,
                                     description="Seconds from dispatch to the end of a job.")
        self.stage_seconds = Histogram("acestep_stage_seconds", boundaries=_SECONDS, tag_keys=("stage",),
                                       description="Seconds a job spent in each stage, as the driver saw it.")
        self.stage_batch_size = Histogram("acestep_stage_batch_size", boundaries=[1, 2, 4, 8, 16, 32, 64],
                                          tag_keys=("stage",), description="Requests per stage batch.")
        self.dit_step_seconds = Histogram("acestep_dit_step_seconds", boundaries=_SECONDS,
                                          description="Seconds per DiT denoising step (one batch).")
        self.audio_seconds = Counter("acestep_audio_seconds_generated_total",
                                     description="Seconds of audio written, all outputs.")


@cache
def metrics() -> Metrics:
    """The process's metric objects, created on first use (inside the replica or actor that reports them)."""
    return Metrics()
