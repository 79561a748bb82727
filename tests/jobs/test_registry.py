"""JobRegistry semantics, on the plain class (the HTTP tests run it as the real actor)."""

import asyncio

import pytest

from jobs.config import FilesConfig, QueueConfig
from jobs.registry import JobRegistry


def run(coro):
    return asyncio.run(coro)


def test_fifo_positions_eta_and_capacity():
    async def scenario():
        reg = JobRegistry(QueueConfig(max_queued_jobs=2, max_running_jobs=1, initial_avg_job_seconds=4.0))
        assert await reg.submit("a", {}) == {"accepted": True, "job_id": "a", "status": "queued", "queue_position": 1}
        assert (await reg.submit("b", {}))["queue_position"] == 2
        full = await reg.submit("c", {})
        assert full["accepted"] is False and full["retry_after_s"] >= 1
        assert await reg.view("c") is None  # a refused job leaves no record
        view = await reg.view("b")
        assert (view["queue_position"], view["eta_seconds"]) == (2, 8.0)
        [leased] = await reg.lease("d1", 5, wait_s=0)
        assert leased["job_id"] == "a" and leased["attempt"] == 1
        assert await reg.lease("d1", 5, wait_s=0) == []  # max_running_jobs=1
        assert (await reg.view("b"))["queue_position"] == 1
        assert await reg.finish("a#1", "d1", {"ok": True})
        assert (await reg.view("a"))["status"] == "succeeded"
        assert not await reg.finish("a#1", "d1", {})  # status only moves forward
        assert [j["job_id"] for j in await reg.lease("d1", 5, wait_s=0)] == ["b"]
        stats = await reg.stats()
        assert stats["jobs"] == {"total": 2, "queued": 0, "running": 1, "succeeded": 1, "failed": 0, "canceled": 0}
    run(scenario())


def test_lapsed_lease_is_retried_then_failed(monkeypatch):
    async def scenario():
        reg = JobRegistry(QueueConfig(lease_seconds=0.05, max_attempts=2))
        await reg.submit("j", {})
        await reg.lease("dead-driver", 1, wait_s=0)
        await asyncio.sleep(0.1)
        view = await reg.view("j")
        assert view["status"] == "running" and view["progress"]["stage"] == "retry_wait"
        [again] = await reg.lease("d2", 1, wait_s=0)
        assert again["attempt"] == 2
        assert not await reg.heartbeat("j#1", "dead-driver")  # the old driver lost it
        await asyncio.sleep(0.1)
        view = await reg.view("j")
        assert view["status"] == "failed" and "giving up" in view["error"] and "\n" not in view["error"]
    run(scenario())


def test_retryable_failure_requeues_once():
    async def scenario():
        reg = JobRegistry(QueueConfig(max_attempts=2))
        await reg.submit("j", {})
        await reg.lease("d", 1, wait_s=0)
        assert await reg.fail("j#1", "d", "replica died", retry=True)
        await reg.lease("d", 1, wait_s=0)
        assert not await reg.fail("j#1", "d", "a late report of the first attempt", retry=True)
        assert await reg.fail("j#2", "d", "replica died again", retry=True)
        assert (await reg.view("j"))["error"] == "replica died again"
    run(scenario())


def test_uploads_are_deleted_when_the_job_ends(tmp_path):
    async def scenario():
        reg = JobRegistry(QueueConfig(), files(tmp_path))
        job_id = "12345678-1234-1234-1234-1234567890ab"
        reg.uploads.put(reg.uploads.key(job_id, "src_audio"), b"x")
        await reg.submit(job_id, {}, f"uploads/{job_id}")
        await reg.lease("d", 1, wait_s=0)
        await reg.fail(f"{job_id}#1", "d", "boom")
        await asyncio.wait_for(asyncio.gather(*reg._deletes), 5)  # deleted off the event loop
        assert reg.uploads.get(reg.uploads.key(job_id, "src_audio")) is None
        assert not (tmp_path / "uploads" / job_id).exists()
    run(scenario())


def test_average_is_the_measured_time_between_job_ends_while_jobs_wait():
    async def scenario():
        reg = JobRegistry(QueueConfig(initial_avg_job_seconds=100.0, max_running_jobs=1))
        for i in range(6):
            await reg.submit(f"j{i}", {})
        for i in range(4):
            [job] = await reg.lease("d", 1, wait_s=0)
            await asyncio.sleep(0.05)
            await reg.finish(job["attempt_id"], "d", {})
            assert reg.avg_job_seconds() == (100.0 if i < 3 else pytest.approx(0.05, abs=0.04))
        view = await reg.view("j5")
        assert view["queue_position"] == 2 and view["eta_seconds"] == pytest.approx(2 * view["avg_job_seconds"])
    run(scenario())


def test_dispatch_and_eta_follow_the_stages_slots_and_throughput():
    async def scenario():
        reg = JobRegistry(QueueConfig(max_running_jobs=32, initial_avg_job_seconds=9.0))
        for i in range(10):
            await reg.submit(f"j{i}", {})
        assert reg.capacity() == 32 and reg.avg_job_seconds() == 9.0  # nothing reported yet
        # One DiT replica with 4 slots and one codec replica with 2: 6 jobs may run.
        assert await reg.report_stage("dit", "d1", 4, 0.0, 0) == {"backlog": 10}
        await reg.report_stage("codec", "c1", 2, 0.0, 0)
        assert reg.capacity() == 6
        assert len(await reg.lease("driver", 100, wait_s=0)) == 6
        # The DiT then finishes 4 jobs in 2 busy seconds: 0.5 s per job; the codec 4 in 1 s.
        await reg.report_stage("dit", "d1", 4, 2.0, 4)
        await reg.report_stage("codec", "c1", 2, 1.0, 4)
        assert reg.avg_job_seconds() == pytest.approx(0.5)
        # A second DiT replica (not measured yet, so counted at the mean) halves the DiT's seconds per job.
        await reg.report_stage("dit", "d2", 4, 0.0, 0)
        assert reg.capacity() == 10
        assert reg.avg_job_seconds() == pytest.approx(0.25)
        view = await reg.view("j9")
        assert view["queue_position"] == 4 and view["eta_seconds"] == pytest.approx(4 * view["avg_job_seconds"])
        stats = await reg.stats()
        assert stats["running_capacity"] == 10 and stats["stages"]["dit"]["replicas"] == 2
    run(scenario())


@pytest.mark.parametrize("wait", [0.0, 0.2])
def test_lease_waits_for_work(wait):
    async def scenario():
        reg = JobRegistry(QueueConfig())
        task = asyncio.create_task(reg.lease("d", 1, wait_s=wait))
        await asyncio.sleep(0.05)
        await reg.submit("late", {})
        return await task
    leased = run(scenario())
    assert [j["job_id"] for j in leased] == (["late"] if wait else [])


def files(tmp_path) -> FilesConfig:
    return FilesConfig(output_dir=str(tmp_path / "results"), upload_dir=str(tmp_path / "uploads"),
                       journal_path=str(tmp_path / "journal.sqlite3"))


def test_journal_restores_every_job(tmp_path):
    async def first_life():
        reg = JobRegistry(QueueConfig(), files(tmp_path), "a")
        for name in ("done", "running", "queued1", "queued2"):
            await reg.submit(name, {"n": name})
        await reg.lease("d1", 2, wait_s=0)
        await reg.finish("done#1", "d1", {"audio_paths": ["x"]})
        await reg.submit("other-app-job", {})

    async def second_life():
        reg = JobRegistry(QueueConfig(), files(tmp_path), "a")
        assert (await reg.view("done"))["result"]["audio_paths"] == ["x"]
        assert [(await reg.view(j))["queue_position"] for j in ("queued1", "queued2", "other-app-job")] == [1, 2, 3]
        running = await reg.view("running")
        assert running["status"] == "running"
        assert await reg.heartbeat("running#1", "d1")  # its driver, if alive, keeps it
        assert JobRegistry(QueueConfig(), files(tmp_path), "b").jobs == {}  # another app's table
    run(first_life())
    run(second_life())


def test_running_job_of_a_dead_driver_is_rerun_after_restart(tmp_path):
    async def scenario():
        reg = JobRegistry(QueueConfig(lease_seconds=0.05), files(tmp_path))
        await reg.submit("j", {})
        await reg.lease("dead", 1, wait_s=0)
        reborn = JobRegistry(QueueConfig(lease_seconds=0.05), files(tmp_path))
        await asyncio.sleep(0.1)
        [again] = await reborn.lease("new", 1, wait_s=0)
        assert again["job_id"] == "j" and again["attempt"] == 2
    run(scenario())


def test_cancel_queued_and_running():
    async def scenario():
        reg = JobRegistry(QueueConfig())
        for name in "abc":
            await reg.submit(name, {})
        await reg.lease("d", 1, wait_s=0)
        assert await reg.cancel("b") == "canceled"
        assert (await reg.view("c"))["queue_position"] == 1
        assert await reg.cancel("a") == "canceled"
        assert not await reg.heartbeat("a#1", "d")  # the driver stops
        assert await reg.report_steps({"a#1": (3, 8)}) == ["a#1"]  # and the DiT drops it
        assert not await reg.finish("a#1", "d", {})
        view = await reg.view("a")
        assert (view["status"], view["error"]) == ("canceled", "canceled by the client")
        assert await reg.cancel("nope") is None
    run(scenario())


def test_deadline_fails_a_job_that_runs_too_long():
    async def scenario():
        reg = JobRegistry(QueueConfig(job_timeout_s=0.05))
        await reg.submit("slow", {})
        await reg.lease("d", 1, wait_s=0)
        await asyncio.sleep(0.1)
        view = await reg.view("slow")
        assert view["status"] == "failed" and view["error"].startswith("deadline exceeded")
    run(scenario())


def test_idempotency_key():
    async def scenario():
        reg = JobRegistry(QueueConfig())
        first = await reg.submit("j1", {}, None, ("key", "fp1"))
        again = await reg.submit("j2", {}, None, ("key", "fp1"))
        assert again["duplicate"] and again["job_id"] == first["job_id"] == "j1"
        assert await reg.submit("j3", {}, None, ("key", "fp2")) == {"accepted": False, "conflict": "j1"}
        assert set(reg.jobs) == {"j1"}
    run(scenario())


def test_retention_deletes_job_files_and_key(tmp_path):
    async def scenario():
        cfg = files(tmp_path)
        reg = JobRegistry(QueueConfig(retention_s=0.05), cfg)
        job_id = "12345678-1234-1234-1234-1234567890ab"
        await reg.submit(job_id, {}, None, ("k", "f"))
        await reg.lease("d", 1, wait_s=0)
        reg.store.put(f"{job_id}/0.mp3", b"x")
        await reg.finish(f"{job_id}#1", "d", {})
        await asyncio.sleep(0.1)
        assert await reg.view(job_id) is None
        await asyncio.wait_for(asyncio.gather(*reg._deletes), 5)  # deleted off the event loop
        assert reg.store.get(f"{job_id}/0.mp3") is None and "k" not in reg.idempotency
        await reg._durable()  # the journal's delete runs on its writer thread
        assert JobRegistry(QueueConfig(), cfg).jobs == {}  # gone from the journal too
    run(scenario())


def test_a_job_failed_while_waiting_for_a_retry_is_never_leased_again():
    async def scenario():
        reg = JobRegistry(QueueConfig(lease_seconds=0.05, job_timeout_s=0.3, max_attempts=3))
        await reg.submit("j", {})
        await reg.lease("dead", 1, wait_s=0)
        await asyncio.sleep(0.1)  # the lease lapses: back in line for a retry
        assert (await reg.view("j"))["progress"]["stage"] == "retry_wait"
        await asyncio.sleep(0.3)  # and its deadline passes while it waits
        view = await reg.view("j")
        assert view["status"] == "failed" and view["error"].startswith("deadline exceeded")
        assert await reg.lease("d2", 1, wait_s=0) == []
        assert (await reg.view("j"))["status"] == "failed"
        assert (await reg.stats())["jobs"]["failed"] == 1
    run(scenario())


def test_reports_of_an_older_attempt_are_refused():
    async def scenario():
        reg = JobRegistry(QueueConfig(max_attempts=3))
        await reg.submit("j", {})
        [first] = await reg.lease("d", 1, wait_s=0)
        assert first["attempt_id"] == "j#1"
        assert await reg.fail("j#1", "d", "replica died", retry=True)
        [second] = await reg.lease("d", 1, wait_s=0)  # the same driver may get the retry
        assert second["attempt_id"] == "j#2"
        assert await reg.report_steps({"j#1": (3, 8), "j#2": (1, 8)}) == ["j#1"]  # the orphan stops
        assert not await reg.heartbeat("j#1", "d") and await reg.heartbeat("j#2", "d")
        assert not await reg.finish("j#1", "d", {"stale": True})
        assert await reg.finish("j#2", "d", {"fresh": True})
        assert (await reg.view("j"))["result"]["fresh"] is True
    run(scenario())


def test_a_retried_submit_never_queues_the_job_twice(tmp_path):
    async def scenario():
        reg = JobRegistry(QueueConfig(), files(tmp_path))
        assert (await reg.submit("j", {"n": 1}))["queue_position"] == 1
        # The answer was lost (say the actor restarted after journaling) and the client sent the same call again.
        reborn = JobRegistry(QueueConfig(), files(tmp_path))
        again = await reborn.submit("j", {"n": 1})
        assert again["duplicate"] and again["queue_position"] == 1
        assert list(reborn.queue) == ["j"] and (await reborn.stats())["jobs"]["queued"] == 1
    run(scenario())


def test_the_latest_deploys_config_wins_also_after_a_restart(tmp_path):
    async def scenario():
        old = files(tmp_path)
        reg = JobRegistry(QueueConfig(max_queued_jobs=5), old)
        new = old.model_copy(update={"output_dir": str(tmp_path / "elsewhere")})
        await reg.configure(QueueConfig(max_queued_jobs=1), new)
        assert reg.store.root == str(tmp_path / "elsewhere") and reg.config.max_queued_jobs == 1
        # Ray restarts the actor with the arguments it was first created with: the journal has the latest.
        restarted = JobRegistry(QueueConfig(max_queued_jobs=5), old)
        assert restarted.store.root == str(tmp_path / "elsewhere") and restarted.config.max_queued_jobs == 1
        await restarted.submit("a", {})
        assert not (await restarted.submit("b", {}))["accepted"]
    run(scenario())


def test_stats_show_the_jobs_inside_each_stage():
    async def scenario():
        reg = JobRegistry(QueueConfig())
        await reg.report_stage("dit", "d1", 8, 0.0, 0, in_flight=2)
        await reg.report_stage("dit", "d2", 8, 0.0, 0, in_flight=1)
        await reg.report_stage("codec", "c1", 4, 0.0, 0)
        stages = (await reg.stats())["stages"]
        assert (stages["dit"]["in_flight"], stages["codec"]["in_flight"]) == (3, 0)
    run(scenario())


def test_a_long_poll_answers_on_a_change_or_after_its_wait():
    async def scenario():
        reg = JobRegistry(QueueConfig(max_running_jobs=1))
        await reg.submit("a", {})
        await reg.submit("b", {})
        start = asyncio.get_running_loop().time()
        assert (await reg.view("b", wait_s=0.2))["queue_position"] == 2  # nothing changed: after the wait
        assert asyncio.get_running_loop().time() - start >= 0.2
        poll = asyncio.create_task(reg.view("b", wait_s=10))
        await asyncio.sleep(0.05)
        assert not poll.done()
        await reg.lease("d", 1, wait_s=0)  # "a" leaves the line: "b" moves up
        assert (await asyncio.wait_for(poll, 1))["queue_position"] == 1
        poll = asyncio.create_task(reg.view("a", wait_s=10))
        await asyncio.sleep(0.05)
        await reg.report_steps({"a#1": (1, 8)})
        assert (await asyncio.wait_for(poll, 1))["progress"] == {"stage": "diffusion", "step": 1, "total": 8}
        await reg.finish("a#1", "d", {})
        start = asyncio.get_running_loop().time()
        assert (await reg.view("a", wait_s=10))["status"] == "succeeded"  # finished: at once
        assert asyncio.get_running_loop().time() - start < 1
    run(scenario())


def test_one_heartbeat_call_carries_all_of_a_drivers_jobs():
    async def scenario():
        reg = JobRegistry(QueueConfig(lease_seconds=0.3))
        for job in ("a", "b", "c"):
            await reg.submit(job, {})
        await reg.lease("d", 3, wait_s=0)
        await reg.cancel("b")
        for _ in range(4):  # past two lease periods, kept alive by the batched beat alone
            assert await reg.heartbeats("d", {"a#1": {"stage": "condition", "step": 0, "total": 0}, "b#1": None,
                                              "c#1": None}) == ["b#1"]
            await asyncio.sleep(0.15)
        assert (await reg.view("a"))["progress"]["stage"] == "condition"
        assert (await reg.view("c"))["status"] == "running"
        assert await reg.heartbeats("other-driver", {"a#1": None}) == ["a#1"]
    run(scenario())


def test_the_result_carries_the_registrys_times_in_its_timeline():
    async def scenario():
        reg = JobRegistry(QueueConfig())
        await reg.submit("j", {})
        await reg.lease("d", 1, wait_s=0)
        await reg.finish("j#1", "d", {"timeline": {"stages": {"diffusion": {"started": 1.0}}}})
        view = await reg.view("j")
        timeline = view["result"]["timeline"]
        assert timeline["submitted"] == view["created_at"] and timeline["finished"] == view["finished_at"]
        assert timeline["submitted"] <= timeline["leased"] <= timeline["finished"]
        assert timeline["stages"] == {"diffusion": {"started": 1.0}}
    run(scenario())


def test_the_eta_simulates_the_line_through_the_dits_rounds():
    """Two slots (DiT and AudioCodec one each), a DiT that runs one job per round: each job spends condition 0.1 s,
    4 steps x 0.5 s (10 s of audio, 1 output: 250 frames x 2 ms) and decode 0.4 s. The two running jobs reach the
    DiT together, but it runs them one after the other: they end at 2.5 s and 4.5 s, and the next ones follow as
    the DiT frees (the old model, one slot per job, said 2.5, 2.5 and 5.0)."""
    async def scenario():
        reg = JobRegistry(QueueConfig(max_running_jobs=8, initial_avg_job_seconds=100.0))
        spec = {"request": {"inference_steps": 4, "audio_duration": 10.0, "batch_size": 1}}
        for i in range(5):
            await reg.submit(f"j{i}", spec)
        dit = {"fixed_s": 0.0, "per_frame_s": 0.002, "frames_per_s": 25.0, "cfg": False,
               "config": {"max_batch_size": 1, "max_round_jobs": 1, "batch_wait_timeout_s": 0.0}}
        await reg.report_stage("condition", "c", 8, 0.0, 0, latency_s=0.1)
        await reg.report_stage("dit", "d", 1, 0.0, 0, latency_s=0.5, model=dit)
        await reg.report_stage("codec", "k", 1, 0.0, 0, latency_s=0.4)
        assert len(await reg.lease("driver", 8, wait_s=0)) == 2
        etas = [(await reg.view(f"j{i}"))["eta_seconds"] for i in (2, 3, 4)]
        assert etas == [pytest.approx(2.5, abs=0.05), pytest.approx(4.5, abs=0.05), pytest.approx(6.5, abs=0.05)]
        await reg.report_steps({"j0#1": (3, 4)})  # j0: one step and the decode left; j1 still before the DiT
        await asyncio.sleep(0.05)  # the schedule is recomputed after a change once 10x its last cost has passed
        assert (await reg.view("j2"))["eta_seconds"] == pytest.approx(0.9, abs=0.05)
    run(scenario())


def test_each_model_runs_within_its_own_dit_slots():
    """Two models: the default (`dit`, 3 slots) and `b` (`dit:b`, 1 slot, a DiT twice as slow), one AudioCodec slot:
    5 jobs at once, at most 4 of the default's and 2 of b's. A backlog of b's jobs ahead in line holds back no
    default-model job, each stage's autoscaler sees its own model's backlog, and each model's ETA comes from its own
    DiT."""
    async def scenario():
        reg = JobRegistry(QueueConfig(max_running_jobs=16, initial_avg_job_seconds=100.0))
        b = {"model": "b", "request": {"inference_steps": 4, "audio_duration": 10.0, "batch_size": 1}}
        default = {"model": None, "request": b["request"]}
        for i in range(4):
            await reg.submit(f"b{i}", b)
        for i in range(4):
            await reg.submit(f"a{i}", default)
        dit = {"fixed_s": 0.0, "per_frame_s": 0.002, "frames_per_s": 25.0, "cfg": False,
               "config": {"max_batch_size": 1, "max_round_jobs": 1, "batch_wait_timeout_s": 0.0}}
        assert await reg.report_stage("dit", "d", 3, 0.0, 0, latency_s=0.5, model=dit) == {"backlog": 4}
        slow = {**dit, "per_frame_s": 0.004}
        assert await reg.report_stage("dit:b", "e", 1, 0.0, 0, latency_s=1.0, model=slow) == {"backlog": 4}
        assert await reg.report_stage("codec", "k", 1, 0.0, 0, latency_s=0.4) == {"backlog": 8}
        leased = [j["job_id"] for j in await reg.lease("driver", 16, wait_s=0)]
        assert leased == ["b0", "b1", "a0", "a1", "a2"]
        assert await reg.lease("driver", 16, wait_s=0) == []
        assert [(await reg.view(f"b{i}"))["queue_position"] for i in (2, 3)] == [1, 2]  # their place in line kept
        assert (await reg.report_stage("dit:b", "e", 1, 0.0, 0))["backlog"] == 2
        assert (await reg.report_stage("dit", "d", 3, 0.0, 0))["backlog"] == 1
        # a3 waits for a0 (4 steps x 0.5 s, and the decode), b2 for b0 on the slower DiT.
        assert (await reg.view("a3"))["eta_seconds"] == pytest.approx(2.4, abs=0.1)
        assert (await reg.view("b2"))["eta_seconds"] == pytest.approx(4.4, abs=0.1)
        assert await reg.finish("a0#1", "driver", {})
        assert [j["job_id"] for j in await reg.lease("driver", 16, wait_s=0)] == ["a3"]  # b still has no room
        assert await reg.finish("b0#1", "driver", {})
        assert [j["job_id"] for j in await reg.lease("driver", 16, wait_s=0)] == ["b2"]
    run(scenario())


def test_reads_do_not_wait_behind_journal_writes(tmp_path, monkeypatch):
    """A slow disk delays the writer (the submit answers once its record is on disk), never a status read."""
    async def scenario():
        reg = JobRegistry(QueueConfig(), files(tmp_path))
        await reg.submit("a", {})
        save = reg.journal.save

        def slow_save(*args):
            import time
            time.sleep(0.5)
            save(*args)

        monkeypatch.setattr(reg.journal, "save", slow_save)
        loop = asyncio.get_running_loop()
        start = loop.time()
        submit = asyncio.create_task(reg.submit("b", {}))
        await asyncio.sleep(0.01)
        assert (await reg.view("a"))["status"] == "queued"
        assert loop.time() - start < 0.3
        assert not submit.done()
        assert (await submit)["accepted"] and loop.time() - start >= 0.5
    run(scenario())


def test_views_answers_several_jobs_in_one_call():
    async def scenario():
        reg = JobRegistry(QueueConfig())
        await reg.submit("a", {})
        await reg.submit("b", {})
        a, unknown, b = await reg.views(["a", "nope", "b"])
        assert unknown is None and (a, b) == (await reg.view("a"), await reg.view("b"))
        assert b["queue_position"] == 2
    run(scenario())


def test_a_long_poll_since_an_older_view_answers_at_once():
    """A change that landed between a client's two calls is not waited past: `since` is the key it has."""
    async def scenario():
        reg = JobRegistry(QueueConfig())
        await reg.submit("a", {})
        first = await reg.view("a")
        await reg.lease("d", 1, wait_s=0)  # the change lands between the calls
        loop = asyncio.get_running_loop()
        start = loop.time()
        view = await reg.view("a", 5.0, since=[first["status"], first["queue_position"], "queued", 0, 0])
        assert view["status"] == "running" and loop.time() - start < 1.0
    run(scenario())
