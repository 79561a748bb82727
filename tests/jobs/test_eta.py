"""The ETA's pipeline simulation (`jobs.eta`): rounds, passes and slots, against schedules worked out by hand."""

import pytest

from jobs.eta import DiTModel, SimJob, lease_times
from jobs.step_scheduler import StepSchedulingConfig


def _jobs(prefix, count, frames=250, rows=1, steps=4):
    return [SimJob(f"{prefix}{i}", rows=rows, frames=frames, steps_left=steps) for i in range(count)]


def test_jobs_in_one_round_share_its_passes():
    """A DiT that batches 4 jobs in one pass costing 0.1 s + 0.001 s per row x frame: 4 jobs of 100 frames take
    0.5 s a step; 4 steps, then 0.2 s of decode, after the idle DiT's 0.05 s wait for company. Four slots: the next
    four start when the whole batch has finished, the fifth when they have."""
    dit = DiTModel(fixed_s=0.1, per_frame_s=0.001, config=StepSchedulingConfig(max_batch_size=4, max_round_jobs=4))
    running = [("before_dit", 0.0, job) for job in _jobs("r", 4, frames=100)]
    starts = lease_times(0.0, 4, dit, 1, condition_s=0.0, codec_s=0.2, running=running,
                         waiting=_jobs("w", 5, frames=100))
    assert [starts[f"w{i}"] for i in range(5)] == [pytest.approx(2.25)] * 4 + [pytest.approx(4.5)]


def test_a_round_splits_by_length_as_the_scheduler_does():
    """A 4,500-frame job and a 1,500-frame one at the H200's pass cost (17.5 ms + 8.8 us per row x frame) take two
    passes (padding 3,000 frames costs more than a pass), so a step costs 17.5 + 39.6 + 17.5 + 13.2 = 87.8 ms."""
    dit = DiTModel(fixed_s=0.0175, per_frame_s=8.8e-6, overhead=0.0175 / 8.8e-6,
                   config=StepSchedulingConfig(max_batch_size=8))
    long, short = SimJob("long", 1, 4500, 8), SimJob("short", 1, 1500, 8)
    assert dit.round_seconds([long, short]) == pytest.approx(0.0878, abs=1e-4)
    starts = lease_times(0.0, 2, dit, 1, condition_s=0.0, codec_s=0.0, running=[("dit", 0.0, long),
                                                                                    ("dit", 0.0, short)],
                         waiting=_jobs("w", 1))
    assert starts["w0"] == pytest.approx(8 * 0.0878, abs=1e-3)


def test_two_replicas_take_the_jobs_between_them():
    dit = DiTModel(fixed_s=0.0, per_frame_s=0.002, config=StepSchedulingConfig(max_batch_size=1, max_round_jobs=1,
                                                                               batch_wait_timeout_s=0.0))
    running = [("before_dit", 0.1, job) for job in _jobs("r", 2)]
    # Each job: 4 steps x 0.5 s on its own replica; then the next two go the same way.
    starts = lease_times(0.0, 2, dit, 2, condition_s=0.1, codec_s=0.4, running=running, waiting=_jobs("w", 3))
    assert [starts[f"w{i}"] for i in range(3)] == [pytest.approx(2.5), pytest.approx(2.5), pytest.approx(5.0)]


def test_jobs_that_leave_the_dit_together_queue_for_the_decoder():
    """Four jobs end their last step together; one decoder takes 0.5 s a job: they free their slots at 0.5, 1.0, 1.5
    and 2.0 s, and the waiting jobs start then (with a latency alone, all four would free at once)."""
    dit = DiTModel(fixed_s=0.0, per_frame_s=1e-9, config=StepSchedulingConfig(max_batch_size=4))
    running = lambda: [("dit", 0.0, job) for job in _jobs("r", 4, steps=1)]  # noqa: E731
    starts = lease_times(0.0, 4, dit, 1, condition_s=0.0, codec_s=0.5, running=running(), waiting=_jobs("w", 4),
                         codec_service_s=0.5, codec_replicas=1)
    assert [starts[f"w{i}"] for i in range(4)] == [pytest.approx(t, abs=1e-3) for t in (0.5, 1.0, 1.5, 2.0)]
    together = lease_times(0.0, 4, dit, 1, condition_s=0.0, codec_s=0.5, running=running(), waiting=_jobs("w", 4))
    assert set(round(t, 3) for t in together.values()) == {0.5}
