"""JobRegistry semantics, on the plain class (the HTTP tests run it as the real actor)."""

import asyncio

import pytest

from jobs.config import QueueConfig
from jobs.registry import JobRegistry


def run(coro):
    return asyncio.run(coro)


def test_fifo_positions_eta_and_capacity():
    async def scenario():
        reg = JobRegistry(QueueConfig(max_queued_jobs=2, max_running_jobs=1, initial_avg_job_seconds=4.0))
        assert await reg.submit("a", {}) == {"accepted": True, "queue_position": 1}
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
        assert await reg.finish("a", "d1", {"ok": True})
        assert (await reg.view("a"))["status"] == "succeeded"
        assert not await reg.finish("a", "d1", {})  # status only moves forward
        assert [j["job_id"] for j in await reg.lease("d1", 5, wait_s=0)] == ["b"]
        stats = await reg.stats()
        assert stats["jobs"] == {"total": 2, "queued": 0, "running": 1, "succeeded": 1, "failed": 0}
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
        assert not await reg.heartbeat("j", "dead-driver")  # the old driver lost it
        await asyncio.sleep(0.1)
        view = await reg.view("j")
        assert view["status"] == "failed" and "giving up" in view["error"] and "\n" not in view["error"]
    run(scenario())


def test_retryable_failure_requeues_once():
    async def scenario():
        reg = JobRegistry(QueueConfig(max_attempts=2))
        await reg.submit("j", {})
        await reg.lease("d", 1, wait_s=0)
        assert await reg.fail("j", "d", "replica died", retry=True)
        await reg.lease("d", 1, wait_s=0)
        assert await reg.fail("j", "d", "replica died again", retry=True)
        assert (await reg.view("j"))["error"] == "replica died again"
    run(scenario())


def test_uploads_are_deleted_when_the_job_ends(tmp_path):
    async def scenario():
        upload = tmp_path / "job"
        upload.mkdir()
        (upload / "src_audio").write_bytes(b"x")
        reg = JobRegistry(QueueConfig())
        await reg.submit("j", {}, str(upload))
        await reg.lease("d", 1, wait_s=0)
        await reg.fail("j", "d", "boom")
        assert not upload.exists()
    run(scenario())


def test_average_uses_real_job_times():
    async def scenario():
        reg = JobRegistry(QueueConfig(initial_avg_job_seconds=100.0))
        for name in "ab":
            await reg.submit(name, {})
        await reg.lease("d", 1, wait_s=0)
        await asyncio.sleep(0.05)
        await reg.finish("a", "d", {})
        assert 0.04 < reg.avg_job_seconds() < 5.0
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
