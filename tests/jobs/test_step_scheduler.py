"""The DiT step scheduler with the real tiny DiT engine, no Ray: who joins a running batch, when, and with what."""

import asyncio
import dataclasses

import numpy as np
import pytest

from jobs.step_scheduler import PassCosts, StepScheduler, StepSchedulingConfig, _cheapest
from models.condition import ConditionEngine, ConditionRequest
from models.dit import DiTEngine, DiTRequest
from models.loading import ModelConfig

CONFIG = ModelConfig(preset="tiny")


@pytest.fixture(scope="module")
def dit():
    return DiTEngine(CONFIG)


@pytest.fixture(scope="module")
def requests_():
    conds = ConditionEngine(CONFIG).encode([ConditionRequest(caption=c, lyrics="", audio_duration=d)
                                            for c, d in (("a", 1.0), ("bb", 1.6), ("ccc", 2.0))])
    return [DiTRequest(condition=c, seeds=[i], num_inference_steps=6, tag=f"job{i}") for i, c in enumerate(conds)]


def _scenario(dit, requests, scheduling, cancel_last=False, **config):
    """Job 0 starts; jobs 1 and 2 arrive after its second step. Returns results and the jobs in each forward."""
    async def main():
        batches: list[int] = []
        arrived = asyncio.Event()

        def on_batch(jobs, seconds):
            batches.append(jobs)
            if len(batches) == 2:
                arrived.set()
        config.setdefault("split", "padding")
        config.setdefault("max_padding", 100.0)  # one forward pass whatever the lengths
        scheduler = StepScheduler(dit, StepSchedulingConfig(scheduling=scheduling, batch_wait_timeout_s=0, **config),
                                  on_batch=on_batch)
        first = asyncio.create_task(scheduler.submit(requests[0]))
        await arrived.wait()
        later = [asyncio.create_task(scheduler.submit(r)) for r in requests[1:]]
        if cancel_last:
            joined = asyncio.Event()  # the last job is in a forward pass with the others: cancel it mid-batch
            scheduler.on_batch = lambda jobs, seconds: (on_batch(jobs, seconds), jobs == 3 and joined.set())
            await asyncio.wait_for(joined.wait(), timeout=60)
            later[-1].cancel()
        results = await asyncio.gather(first, *later, return_exceptions=True)
        assert scheduler.jobs == 0
        return results, batches
    return asyncio.run(main())


def test_step_scheduling_joins_at_the_next_step_and_changes_nothing(dit, requests_):
    alone = dit.generate(requests_)
    results, batches = _scenario(dit, requests_, "step")
    # Job 0 ran its first steps alone (at least the 2 before the others arrived, plus the one in flight then), the
    # others joined at a step boundary, and finished their last steps after job 0 had left.
    joined = batches.index(3)
    assert joined in (2, 3, 4) and batches == [1] * joined + [3] * (6 - joined) + [2] * joined
    for got, expected in zip(results, alone):
        np.testing.assert_allclose(got, expected, atol=2e-5)


def test_request_scheduling_waits_for_the_whole_batch(dit, requests_):
    alone = dit.generate(requests_)
    results, batches = _scenario(dit, requests_, "request")
    assert batches == [1] * 6 + [2] * 6
    for got, expected in zip(results, alone):
        np.testing.assert_allclose(got, expected, atol=2e-5)


def test_budgets_bound_a_forward_pass(dit, requests_):
    _, batches = _scenario(dit, requests_, "step", max_batch_size=2)
    assert max(batches) == 2
    # 1.0 s and 1.6 s of audio are 25 and 40 frames: two rows pad to 80 > 60, so nobody shares.
    _, batches = _scenario(dit, requests_, "step", max_batch_frames=60)
    assert max(batches) == 1


def test_lengths_too_far_apart_take_separate_forward_passes(dit, requests_):
    alone = dit.generate(requests_)
    # 50 and 40 frames pad to 100 for 90 real (11 %); adding 25 frames would pad to 150 for 115 (30 %).
    results, batches = _scenario(dit, requests_, "step", max_padding=0.25)
    assert 3 not in batches and 2 in batches
    for got, expected in zip(results, alone):
        np.testing.assert_allclose(got, expected, atol=2e-5)


def test_a_canceled_caller_leaves_the_batch(dit, requests_):
    alone = dit.generate(requests_)
    results, batches = _scenario(dit, requests_, "step", cancel_last=True)
    assert isinstance(results[2], asyncio.CancelledError)
    np.testing.assert_allclose(results[0], alone[0], atol=2e-5)
    np.testing.assert_allclose(results[1], alone[1], atol=2e-5)
    assert batches[-1] == 1 and 3 in batches


def test_a_registry_stop_reaches_a_job_in_a_round_of_several_batch_keys(dit, requests_):
    """Two jobs with different step counts (two forward passes a round). The registry's answer to a progress report
    stops job0 within one round, whichever pass the answer came back during; job1 runs on to its end."""
    stepped: dict[str, int] = {}

    class CountingEngine:
        def __getattr__(self, name):
            return getattr(dit, name)

        def step(self, states):
            for state in states:
                stepped[state.request.tag] = stepped.get(state.request.tag, 0) + 1
            dit.step(states)

    stop_from = {}

    async def on_progress(steps):
        if steps.get("job0", (0, 0))[0] >= 2:
            stop_from.setdefault("step", stepped["job0"])
            return ["job0"]
        return []

    async def main():
        long_job = dataclasses.replace(requests_[0], num_inference_steps=20)
        scheduler = StepScheduler(CountingEngine(), StepSchedulingConfig(batch_wait_timeout_s=0.05),
                                  on_progress=on_progress)
        return await asyncio.gather(scheduler.submit(long_job), scheduler.submit(requests_[1]))

    stopped, finished = asyncio.run(main())
    assert stopped is None and finished is not None
    assert stepped["job1"] == 6
    assert stepped["job0"] <= stop_from["step"] + 2, stepped  # the step in flight, at most one more


def test_an_idle_stage_waits_for_company_only_when_some_is_coming(dit, requests_):
    """`batch_wait_timeout_s` of 2 s: a job whose caller has nobody else on the way starts at once and gets a record
    of its times; one whose caller says others follow waits for them (and batches with the one that comes)."""
    async def main():
        scheduler = StepScheduler(dit, StepSchedulingConfig(batch_wait_timeout_s=2.0, max_padding=100.0,
                                                             split="padding"))
        record: dict = {}
        await scheduler.submit(requests_[0], record, company=0)
        assert record["started"] - record["arrived"] < 1.0, record
        assert record["arrived"] <= record["started"] <= record["finished"] and record["reports"] == 0
        records = [{}, {}]
        first = asyncio.create_task(scheduler.submit(requests_[1], records[0], company=1))
        await asyncio.sleep(0.5)
        await asyncio.gather(first, scheduler.submit(requests_[2], records[1], company=0))
        assert records[0]["started"] - records[0]["arrived"] >= 0.5  # it waited for the second
        assert [r["max_jobs_per_pass"] for r in records] == [2, 2]
    asyncio.run(main())


def _entries(*jobs):
    """Scheduler entries for (rows, frames) pairs, longest first (what `split_passes` hands `_cheapest`)."""
    state = lambda rows, frames: type("State", (), {"rows": rows, "frames": frames})()  # noqa: E731
    return [type("Entry", (), {"state": state(r, f)})() for r, f in sorted(jobs, key=lambda j: -j[1])]


def _shape(passes):
    return [[e.state.frames for e in p] for p in passes]


def test_the_cheapest_split_carries_padding_only_where_it_saves_a_pass():
    """The H200 turbo DiT: 17.5 ms a pass + 8.8 us per row x frame, i.e. a pass is worth ~2,000 padded frames. A 120 s
    job (3,000 frames) padded to 180 s (4,500) costs 1,500 frames: cheaper than its own pass; a 60 s job padded to
    180 s costs 3,000: dearer, so the 60 s jobs share a pass of their own (padding 60 s to 120 s costs 1,500 each)."""
    config = StepSchedulingConfig(max_batch_size=8, max_batch_frames=36_000)
    jobs = [(1, 4500), (1, 3000), (1, 1500), (1, 1500), (1, 4500)]
    mixed = _entries(*jobs)
    assert _shape(_cheapest(mixed, config, overhead=2000.0)) == [[4500, 4500, 3000], [1500, 1500]]
    assert _shape(_cheapest(mixed, config, overhead=0.0)) == [[4500, 4500], [3000], [1500, 1500]]
    assert _shape(_cheapest(mixed, config, overhead=1e9)) == [[4500, 4500, 3000, 1500, 1500]]
    # The budgets hold whatever the overhead: at most 2 jobs, at most 9,000 padded frames, a job over it alone.
    small = StepSchedulingConfig(max_batch_size=2, max_batch_frames=9_000)
    passes = _cheapest(_entries(*jobs, (4, 4000)), small, overhead=1e9)
    assert _shape(passes) == [[4500, 4500], [4000], [3000], [1500, 1500]]


def test_pass_costs_fit_the_fixed_cost_once_passes_of_different_sizes_are_measured():
    costs = PassCosts()
    for work in (1000, 1000, 1000, 1000, 1000, 1000, 1000):
        costs.add(work, 0.0175 + 8.8e-6 * work)
    assert costs.overhead() is None  # too few passes
    costs.add(1000, 0.0175 + 8.8e-6 * 1000)
    assert costs.overhead() is None  # one size only: no slope
    for work in (4500, 9000, 36000, 18000):
        costs.add(work, 0.0175 + 8.8e-6 * work)
    assert costs.overhead() == pytest.approx(0.0175 / 8.8e-6, rel=1e-6)


def test_a_round_holds_more_jobs_than_a_pass_and_the_measured_cost_splits_it(dit, requests_):
    """max_batch_size 2, so a round of 4 jobs runs as 2 passes. With passes measured as costing a large fixed
    overhead, the split pairs jobs to minimise passes; measured as pure per-frame cost, it never pads. Results are the
    jobs' own either way."""
    four = [*requests_, dataclasses.replace(requests_[2], seeds=[7], tag="job3")]  # 25, 40, 50 and 50 frames
    alone = dit.generate(four)

    async def run(fixed: float):
        passes: list[list[int]] = []

        class Recording:
            def __getattr__(self, name):
                return getattr(dit, name)

            def step(self, states):
                passes.append(sorted(s.frames for s in states))
                dit.step(states)

        scheduler = StepScheduler(Recording(), StepSchedulingConfig(max_batch_size=2, batch_wait_timeout_s=1.0))
        for work in (50, 100, 200) * 3:  # measured before: seconds = fixed + 1e-4 x padded work
            scheduler.costs.add(work, fixed + 1e-4 * work)
        scheduler.costs.add = lambda work, seconds: None  # keep the measurement the test set
        results = await asyncio.gather(*(scheduler.submit(r) for r in four))
        return results, passes

    results, passes = asyncio.run(run(fixed=1.0))
    assert passes[0] == [50, 50] and passes[1] == [25, 40], passes[:2]  # all four in the first round, 2 passes
    for got, expected in zip(results, alone):
        np.testing.assert_allclose(got, expected, atol=2e-5)
    results, passes = asyncio.run(run(fixed=0.0))
    assert passes[:3] == [[50, 50], [40], [25]], passes[:3]
    for got, expected in zip(results, alone):
        np.testing.assert_allclose(got, expected, atol=2e-5)
