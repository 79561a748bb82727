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
    broken = root / "dit-broken"  # the DiT's fault-injection hook: its engine fails while this file exists
    options = {"DiT": {"user_config": {"fault_injection": str(broken)}}}
    with deployed(args, APP, "/f", serve_http, options=options) as url:
        yield args, url, serve_http, broken


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
    _, url, _, _ = fault_app
    with httpx.Client(base_url=url, timeout=30) as client:
        ids = submit_many(client, 4, 20)
        poll(client, ids[0], until=("running",))
        ray.kill(registry(), no_restart=False)  # the actor restarts and reads its journal back
        assert_all_succeeded_and_downloadable(client, ids)


def test_registry_killed_for_good_is_recreated_from_the_journal(fault_app):
    _, url, _, _ = fault_app
    with httpx.Client(base_url=url, timeout=30) as client:
        done = submit_many(client, 1, 1)
        assert poll(client, done[0])["status"] == "succeeded"
        ids = submit_many(client, 3, 20)
        poll(client, ids[0], until=("running",))
        ray.kill(registry(), no_restart=True)  # gone: the next caller creates it again, from the journal
        assert_all_succeeded_and_downloadable(client, done + ids)


def test_app_deleted_and_deployed_again_with_jobs_in_flight(fault_app):
    args, url, base, broken = fault_app
    with httpx.Client(base_url=url, timeout=30) as client:
        ids = submit_many(client, 3, 20)
        poll(client, ids[0], until=("running",))
    serve.delete(APP)  # every replica, the driver holding the running job's lease included
    ray.kill(registry(), no_restart=True)  # and the registry's memory: only the journal remains
    deploy(args, APP, "/f", base, options={"DiT": {"user_config": {"fault_injection": str(broken)}}})
    with httpx.Client(base_url=url, timeout=30) as client:
        assert_all_succeeded_and_downloadable(client, ids)


def test_stage_replica_killed_mid_job(fault_app):
    _, url, _, _ = fault_app
    with httpx.Client(base_url=url, timeout=30) as client:
        [job_id] = submit_many(client, 1, 120)
        poll_stage(client, job_id, "decode")
        [codec] = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#AudioCodec" in a["name"]]
        ray.kill(ray.get_actor(codec["name"], namespace=codec["namespace"]), no_restart=True)
        view = poll(client, job_id, timeout=300)
        assert view["status"] == "succeeded", view  # sent again once Serve replaced the replica
        assert view["attempts"] == 1, view  # a replica that went away costs the job none of its attempts
        later = submit_many(client, 1, 1)
        assert_all_succeeded_and_downloadable(client, later)


def test_broken_engine_fails_its_jobs_then_the_replica_is_replaced(fault_app):
    _, url, _, broken = fault_app
    broken.touch()  # the DiT engine now fails every call, as with a lost GPU context
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            for job_id in submit_many(client, 3, 1):
                view = poll(client, job_id)
                assert view["status"] == "failed" and view["error"].startswith("diffusion: ") and \
                    "\n" not in view["error"]
            [dit] = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#DiT" in a["name"]]
            broken.unlink()  # a replacement replica gets a working engine
            deadline = time.time() + 180  # health checks every 10 s; then Serve starts a fresh replica
            while any(a["name"] == dit["name"] for a in ray.util.list_named_actors(all_namespaces=True)):
                assert time.time() < deadline, "the broken replica was not replaced"
                time.sleep(1)
            [job_id] = submit_many(client, 1, 1)
            assert poll(client, job_id)["status"] == "succeeded"
    finally:
        broken.unlink(missing_ok=True)
