"""Faults injected for real: the registry actor killed (and restarted, or gone), the app deleted and deployed again,
a stage replica killed mid-job. Nothing is lost and nothing is stuck."""

from __future__ import annotations

import time

import httpx
import pytest
import ray
from ray import serve

from tests.conftest import deploy, deployed

APP = "fault-test"


@pytest.fixture(scope="module")
def fault_app(serve_http, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    args = {"name": APP, "queue": {"max_running_jobs": 1, "lease_seconds": 3, "max_attempts": 3},
            "files": {"output_dir": str(root / "results"), "upload_dir": str(root / "uploads"),
                      "journal_path": str(root / "registry.sqlite3")}}
    with deployed(args, APP, "/f", serve_http) as url:
        yield args, url, serve_http


def poll(client: httpx.Client, job_id: str, until=("succeeded", "failed", "canceled"), timeout=180.0) -> dict:
    """Poll through the fault: a 503 while the registry restarts is an answer to retry, not a failure."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        response = client.get(f"/v1/jobs/{job_id}")
        if response.status_code == 200 and response.json()["status"] in until:
            return response.json()
        assert response.status_code in (200, 503), response.text
        time.sleep(0.1)
    raise TimeoutError(job_id)


def poll_stage(client, job_id, stage, timeout=60.0) -> None:
    deadline = time.time() + timeout
    while (client.get(f"/v1/jobs/{job_id}").json().get("progress") or {}).get("stage") != stage:
        assert time.time() < deadline, f"{job_id} never reached {stage}"
        time.sleep(0.02)


def registry():
    return ray.get_actor(f"registry-{APP}", namespace="acestep")


def submit_many(client, n, duration):
    ids = []
    for i in range(n):
        response = client.post("/v1/music/generate", json={"caption": f"job {i}", "audio_duration": duration,
                                                           "batch_size": 1, "audio_format": "wav"})
        assert response.status_code == 200, response.text
        ids.append(response.json()["job_id"])
    return ids


def assert_all_succeeded_and_downloadable(client, ids):
    for job_id in ids:
        view = poll(client, job_id)
        assert view["status"] == "succeeded", view
        assert client.get(view["result"]["first_audio_path"]).status_code == 200


def test_registry_killed_and_restarted(fault_app):
    _, url, _ = fault_app
    with httpx.Client(base_url=url, timeout=30) as client:
        ids = submit_many(client, 4, 20)
        poll(client, ids[0], until=("running",))
        ray.kill(registry(), no_restart=False)  # the actor restarts and reads its journal back
        assert_all_succeeded_and_downloadable(client, ids)


def test_registry_killed_for_good_is_recreated_from_the_journal(fault_app):
    _, url, _ = fault_app
    with httpx.Client(base_url=url, timeout=30) as client:
        done = submit_many(client, 1, 1)
        assert poll(client, done[0])["status"] == "succeeded"
        ids = submit_many(client, 3, 20)
        poll(client, ids[0], until=("running",))
        ray.kill(registry(), no_restart=True)  # gone: the next caller creates it again, from the journal
        assert_all_succeeded_and_downloadable(client, done + ids)


def test_app_deleted_and_deployed_again_with_jobs_in_flight(fault_app):
    args, url, base = fault_app
    with httpx.Client(base_url=url, timeout=30) as client:
        ids = submit_many(client, 3, 20)
        poll(client, ids[0], until=("running",))
    serve.delete(APP)  # every replica, the driver holding the running job's lease included
    ray.kill(registry(), no_restart=True)  # and the registry's memory: only the journal remains
    deploy(args, APP, "/f", base)
    with httpx.Client(base_url=url, timeout=30) as client:
        assert_all_succeeded_and_downloadable(client, ids)


def test_stage_replica_killed_mid_job(fault_app):
    _, url, _ = fault_app
    with httpx.Client(base_url=url, timeout=30) as client:
        [job_id] = submit_many(client, 1, 120)
        poll_stage(client, job_id, "decode")
        [codec] = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#AudioCodec" in a["name"]]
        ray.kill(ray.get_actor(codec["name"], namespace=codec["namespace"]), no_restart=True)
        view = poll(client, job_id, timeout=300)
        assert view["status"] == "succeeded", view  # retried once Serve replaced the replica
        later = submit_many(client, 1, 1)
        assert_all_succeeded_and_downloadable(client, later)


def test_broken_engine_fails_its_jobs_then_the_replica_is_replaced(fault_app):
    _, url, _ = fault_app
    [dit] = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#DiT" in a["name"]]

    def break_engine(replica) -> str:  # runs in the replica process: lose the model, as a dead GPU context would
        engine = replica._replica_impl._user_callable_wrapper._callable.engine  # Serve internals, test-only
        engine.transformer = None
        return type(engine).__name__

    assert ray.get(ray.get_actor(dit["name"], namespace=dit["namespace"]).__ray_call__.remote(break_engine)) == \
        "DiTEngine"
    with httpx.Client(base_url=url, timeout=30) as client:
        for job_id in submit_many(client, 3, 1):
            view = poll(client, job_id)
            assert view["status"] == "failed" and view["error"].startswith("diffusion: ") and "\n" not in view["error"]
        deadline = time.time() + 180  # health checks every 10 s; then Serve starts a fresh replica
        while True:
            [job_id] = submit_many(client, 1, 1)
            if poll(client, job_id)["status"] == "succeeded":
                break
            assert time.time() < deadline, "the broken replica was not replaced"
            time.sleep(2)
