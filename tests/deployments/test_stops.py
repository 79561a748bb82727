"""Stops that stop and limits that hold, over HTTP: a canceled job leaves the DiT within a scheduling round even
when the round holds several forward passes; a source longer than the server's limit, or a task the model cannot
serve, is a 4xx at submit; the attempt count is visible."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import deployed, wav_bytes
from tests.deployments.conftest import wait_for

APP = "stops-test"


@pytest.fixture(scope="module")
def stops(serve_http, tmp_path_factory):
    root = tmp_path_factory.mktemp("stops")
    args = {"name": APP, "queue": {"max_running_jobs": 4, "max_duration_s": 120, "default_duration_s": 1,
                                   "max_audio_seconds_per_job": 200},
            "files": {"output_dir": str(root / "results"), "upload_dir": str(root / "uploads"),
                      "journal_path": str(root / "registry.sqlite3"), "max_upload_bytes": 4 * 1024 * 1024}}
    with deployed(args, APP, "/stops", serve_http) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def until(condition, timeout: float, what: str, every: float = 0.05):
    deadline = time.time() + timeout
    while not (value := condition()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return value


def dit_in_flight(client) -> int | None:
    return client.get("/v1/stats").json()["stages"].get("dit", {}).get("in_flight")


def test_a_canceled_job_leaves_the_dit_within_a_round_of_two_batch_keys(stops):
    client = stops
    # Different step counts: two forward passes each round, one per batch key. ~0.2 s a step each on this CPU.
    jobs = [client.post("/v1/music/generate", json={"caption": f"long {steps}", "audio_duration": 60,
                                                    "inference_steps": steps, "batch_size": 1}).json()["job_id"]
            for steps in (200, 199)]

    def diffusing(job_id):
        progress = client.get(f"/v1/jobs/{job_id}").json()["progress"] or {}
        return progress.get("stage") == "diffusion" and progress.get("step", 0) >= 2

    until(lambda: all(diffusing(j) for j in jobs), 120, "both jobs to be in the DiT")
    until(lambda: dit_in_flight(client) == 2, 10, "the DiT to report both jobs")
    canceled_at = time.time()
    assert client.post(f"/v1/jobs/{jobs[0]}/cancel").json()["status"] == "canceled"
    # The stage report reaches /v1/stats once a second; the job itself is gone from the DiT within a round.
    until(lambda: dit_in_flight(client) == 1, 10, "the canceled job to leave the DiT")
    left_after = time.time() - canceled_at
    assert diffusing(jobs[1]), "the other job keeps running"
    assert client.get(f"/v1/jobs/{jobs[0]}").json()["status"] == "canceled"
    client.post(f"/v1/jobs/{jobs[1]}/cancel")
    until(lambda: dit_in_flight(client) == 0, 10, "the second job to leave the DiT")
    print(f"\ncanceled job left the DiT (as /v1/stats saw it) {left_after:.2f} s after the cancel")


def test_a_source_longer_than_the_limit_is_refused_at_submit_with_its_length(stops):
    long_source = wav_bytes(150.0, sample_rate=4000)  # 150 s against max_duration_s 120; 1.2 MB
    response = stops.post("/v1/music/generate", data={"task_type": "repaint", "batch_size": "1"},
                          files={"src_audio": ("long.wav", long_source, "audio/wav")})
    assert response.status_code == 422, response.text
    assert "150.0 s" in response.json()["detail"] and "src_audio" in response.json()["detail"]


def test_a_job_costing_more_audio_than_the_server_admits_is_refused(stops):
    response = stops.post("/v1/music/generate", json={"caption": "big", "audio_duration": 60, "batch_size": 4})
    assert response.status_code == 422 and "60 s x 4" in response.json()["detail"], response.text
    source = wav_bytes(60.0, sample_rate=4000)  # no audio_duration: the source's length counts
    response = stops.post("/v1/music/generate", data={"task_type": "repaint", "batch_size": "4"},
                          files={"src_audio": ("s.wav", source, "audio/wav")})
    assert response.status_code == 422 and "x 4" in response.json()["detail"], response.text


def test_the_attempt_count_is_in_the_view(stops):
    job = stops.post("/v1/music/generate", json={"caption": "once", "batch_size": 1}).json()["job_id"]
    view = wait_for(stops, job)
    assert view["status"] == "succeeded" and view["attempts"] == 1
