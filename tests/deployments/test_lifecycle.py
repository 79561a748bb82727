"""Cancel, deadlines, idempotent submit, API keys and retention, over HTTP."""

from __future__ import annotations

import hashlib
import time

import httpx
import pytest

from tests.conftest import deployed, wav_bytes
from tests.deployments.conftest import wait_for

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def life(serve_http, tmp_path_factory):
    root = tmp_path_factory.mktemp("life")
    args = {"name": "life-test",
            "queue": {"max_running_jobs": 1, "job_timeout_s": 6, "retention_s": 4, "default_duration_s": 1},
            "files": {"output_dir": str(root / "results"), "upload_dir": str(root / "uploads"),
                      "journal_path": str(root / "registry.sqlite3")},
            "auth": {"api_key_sha256": [hashlib.sha256(KEY.encode()).hexdigest()]}}
    with deployed(args, "life-test", "/life", serve_http) as url, \
            httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client, url, root


def submit(client, **payload) -> str:
    response = client.post("/v1/music/generate", json={"batch_size": 1, **payload})
    assert response.status_code == 200, response.text
    return response.json()["job_id"]


def test_api_keys(life):
    _, url, _ = life
    # Probes answer without a key (load balancers and kubelets send none); /readyz was 401 before.
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/readyz", timeout=30).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/music/generate"), ("GET", "/v1/jobs/x"),
                             ("GET", "/v1/audio?path=x"), ("GET", "/docs/assets/other.js")):
            response = httpx.request(method, url + path, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.json() == {"detail": "Missing or invalid API key"}
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_docs_load_without_a_key_under_the_prefix(life):
    """The schema and the docs pages hold no data: they load without a key, their URLs under the route prefix."""
    _, url, _ = life
    spec = httpx.get(url + "/openapi.json")
    assert spec.status_code == 200 and spec.json()["servers"] == [{"url": "/life"}]  # where "Try it out" sends
    page = httpx.get(url + "/docs").text
    assert "url: '/life/openapi.json'" in page
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"):
        assert f'"/life/docs/assets/{asset}"' in page
        assert httpx.get(f"{url}/docs/assets/{asset}").status_code == 200
    for path in ("/redoc", "/docs/assets/redoc.standalone.js"):
        assert httpx.get(url + path).status_code == 200


def test_cancel_queued_and_running(life):
    client, _, root = life
    running = submit(client, caption="long", audio_duration=60, inference_steps=8)
    queued = client.post("/v1/music/generate", data={"task_type": "repaint", "batch_size": "1"},
                         files={"src_audio": ("s.wav", wav_bytes(0.5), "audio/wav")}).json()["job_id"]
    after = submit(client, caption="after")
    assert (root / "uploads" / queued).is_dir()
    wait_for_status(client, running, "running")

    canceled = client.post(f"/v1/jobs/{queued}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    wait_until(lambda: not (root / "uploads" / queued).exists(), "a canceled job's upload to be removed")
    assert client.get(f"/v1/jobs/{after}").json()["queue_position"] == 1

    stop = client.post(f"/v1/jobs/{running}/cancel")
    assert stop.status_code == 200 and stop.json()["status"] == "canceled"
    view = wait_for(client, after)  # the slot is free again
    assert view["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{running}").json()["status"] == "canceled"  # and stays so
    assert client.post(f"/v1/jobs/{after}/cancel").status_code == 409
    assert client.post("/v1/jobs/00000000-0000-0000-0000-000000000000/cancel").status_code == 404


def test_deadline_fails_a_job_that_runs_too_long(life):
    client, _, _ = life
    job = submit(client, caption="too long", audio_duration=600, inference_steps=8)
    view = wait_for(client, job, timeout=120)
    assert view["status"] == "failed" and view["error"].startswith("deadline exceeded")
    assert wait_for(client, submit(client, caption="next"))["status"] == "succeeded"


def test_idempotent_submit(life):
    client, _, _ = life
    body = {"caption": "once", "batch_size": 1}
    first = client.post("/v1/music/generate", json=body, headers={"Idempotency-Key": "abc-1"})
    again = client.post("/v1/music/generate", json=body, headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == again.status_code == 200
    assert first.json()["job_id"] == again.json()["job_id"]
    other = client.post("/v1/music/generate", json={**body, "caption": "twice"}, headers={"Idempotency-Key": "abc-1"})
    assert other.status_code == 409 and first.json()["job_id"] in other.json()["detail"]
    fresh = client.post("/v1/music/generate", json=body, headers={"Idempotency-Key": "abc-2"})
    assert fresh.json()["job_id"] != first.json()["job_id"]
    wait_for(client, fresh.json()["job_id"])


def test_finished_jobs_expire_with_their_files(life):
    client, _, root = life
    job = submit(client, caption="ephemeral")
    view = wait_for(client, job)
    assert view["status"] == "succeeded"
    audio = view["result"]["first_audio_path"]
    assert client.get(audio).status_code == 200 and (root / "results" / job).is_dir()
    deadline = time.time() + 30
    while client.get(f"/v1/jobs/{job}").status_code != 404:
        assert time.time() < deadline, "job did not expire"
        time.sleep(0.5)
    assert client.get(audio).status_code == 404
    assert not (root / "results" / job).exists()


def wait_for_status(client, job_id, status, timeout=60.0):
    deadline = time.time() + timeout
    while client.get(f"/v1/jobs/{job_id}").json()["status"] != status:
        assert time.time() < deadline
        time.sleep(0.05)


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
