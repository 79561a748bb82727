"""Following a job without burning the front door: long-polls answered on every change, finished jobs answered by
the ingress itself, a timeline of every hop in the result, and no batch wait for batch-mates that are not coming."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
import ray

from jobs.registry import NAMESPACE
from tests.conftest import deployed

APP = "poll-test"
WAIT_S = 1.5  # every stage's batch_wait_timeout_s: long, so a wait that should not happen cannot hide


@pytest.fixture(scope="module")
def polling(serve_http, tmp_path_factory):
    root = tmp_path_factory.mktemp("poll")
    args = {"name": APP, "queue": {"max_running_jobs": 1, "default_duration_s": 2},
            "files": {"output_dir": str(root / "results"), "upload_dir": str(root / "uploads"),
                      "journal_path": None}}  # no journal: a registry started again knows no job
    waits = {"batch_wait_timeout_s": WAIT_S}
    options = {"ConditionEncoder": {"user_config": {"max_batch_size": 4, **waits}},
               "DiT": {"user_config": {"max_batch_size": 4, **waits}},
               "AudioCodec": {"user_config": {"max_batch_size": 4, **waits}}}
    with deployed(args, APP, "/poll", serve_http, options) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def change(view: dict) -> tuple:
    progress = view["progress"] or {}
    return view["status"], view["queue_position"], progress.get("stage"), progress.get("step")


def follow(client: httpx.Client, job_id: str, timeout: float = 180) -> list[dict]:
    """Long-poll until the job ends; every answer. (An answer without a change is followed by a short pause, so
    that against a server that answers at once this stays a poll.)"""
    views, deadline = [client.get(f"/v1/jobs/{job_id}").json()], time.monotonic() + timeout
    while views[-1]["status"] not in ("succeeded", "failed", "canceled"):
        assert time.monotonic() < deadline, views[-1]
        views.append(client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json())
        if change(views[-1]) == change(views[-2]):
            time.sleep(0.1)
    return views


def test_a_long_poll_answers_each_change_once(polling):
    jobs = [polling.post("/v1/music/generate", json={"caption": f"poll {i}", "inference_steps": 6}).json()["job_id"]
            for i in range(2)]
    views = follow(polling, jobs[1])  # behind the first (one job runs at a time): queued, then running, then done
    assert views[-1]["status"] == "succeeded", views[-1]
    seen = [change(v) for v in views]
    assert all(a != b for a, b in zip(seen, seen[1:])), seen  # no answer without a change (none took 30 s)
    assert ("queued", 1, "queued", 0) in seen and any(s[2] == "diffusion" for s in seen), seen
    started = time.monotonic()
    assert polling.get(f"/v1/jobs/{jobs[1]}", params={"wait": 30}).json()["status"] == "succeeded"
    assert time.monotonic() - started < 10  # a finished job does not wait
    for bad in ("31", "-1", "soon"):
        answer = polling.get(f"/v1/jobs/{jobs[0]}", params={"wait": bad})
        assert answer.status_code == 422 and answer.json()["detail"].startswith("wait"), answer.text


def test_the_result_has_a_timeline_of_every_hop_in_order(polling):
    job_id = polling.post("/v1/music/generate", json={"caption": "timeline", "inference_steps": 2}).json()["job_id"]
    result = follow(polling, job_id)[-1]["result"]
    timeline = result["timeline"]
    order = [timeline["submitted"], timeline["leased"]]
    assert list(timeline["stages"]) == ["condition", "diffusion", "decode"]
    for name, stamps in timeline["stages"].items():
        keys = ["sent", "arrived", "started", "finished", *(["written"] if name == "decode" else []), "returned"]
        assert list(stamps) == keys, (name, stamps)
        order += [stamps[k] for k in keys]
    order.append(timeline["finished"])
    assert order == sorted(order), timeline
    assert timeline["ray_calls"]["stages"] == 3, timeline["ray_calls"]
    assert timeline["ray_calls"]["registry"] >= 1 and timeline["ray_calls"]["dit_to_registry"] >= 1


def test_a_lone_job_does_not_wait_for_batch_mates(polling):
    """Every stage waits up to 1.5 s for batch-mates; a job alone has none coming, so none of them waits."""
    job_id = polling.post("/v1/music/generate", json={"caption": "alone", "inference_steps": 2}).json()["job_id"]
    timeline = follow(polling, job_id)[-1]["result"]["timeline"]
    for name, stamps in timeline["stages"].items():
        assert stamps["started"] - stamps["arrived"] < WAIT_S / 2, (name, stamps)


def test_a_finished_job_is_answered_by_the_ingress_while_the_registry_is_down(polling):
    job_id = polling.post("/v1/music/generate", json={"caption": "cached", "inference_steps": 1}).json()["job_id"]
    finished = follow(polling, job_id)[-1]
    assert finished["status"] == "succeeded"
    ray.kill(ray.get_actor(f"registry-{APP}", namespace=NAMESPACE), no_restart=True)
    # The registry that replaces it (without a journal here) knows no job: only the ingress can answer this one.
    assert polling.get(f"/v1/jobs/{job_id}").json() == finished
    assert polling.get(f"/v1/jobs/{uuid.uuid4()}").status_code == 404
    assert polling.get("/v1/stats").json()["jobs"]["total"] == 0
