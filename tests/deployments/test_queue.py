"""Queue semantics over HTTP: FIFO positions, ETA, 429 without a record, and a failed job's one-line error."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import deployed, wav_bytes
from tests.deployments.conftest import submit, wait_for


@pytest.fixture(scope="module")
def small_queue(serve_http, dirs):
    args = {"name": "queue-test",
            "queue": {"max_queued_jobs": 2, "max_running_jobs": 1, "initial_avg_job_seconds": 7.0},
            "files": {"output_dir": str(dirs["results"]), "upload_dir": str(dirs["uploads"]),
                      "allowed_input_dirs": [str(dirs["inputs"])], "journal_path": str(dirs["journal"])}}
    with deployed(args, "queue-test", "/q", serve_http) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def test_full_queue_is_429_and_leaves_no_record(small_queue, dirs):
    client = small_queue
    blocker = submit(client, json={"caption": "long", "audio_duration": 90, "batch_size": 2}).json()["job_id"]
    deadline = time.time() + 60
    while client.get(f"/v1/jobs/{blocker}").json()["status"] != "running":
        assert time.time() < deadline
        time.sleep(0.05)

    doomed_source = dirs["inputs"] / "vanishing.wav"
    doomed_source.write_bytes(wav_bytes(0.5))
    first = submit(client, json={"task_type": "repaint", "src_audio_path": str(doomed_source), "batch_size": 1})
    second = submit(client, json={"caption": "second", "audio_duration": 1, "batch_size": 1})
    assert (first.json()["queue_position"], second.json()["queue_position"]) == (1, 2)

    view = client.get(f"/v1/jobs/{second.json()['job_id']}").json()
    assert view["status"] == "queued" and view["queue_position"] == 2
    # One job at a time (max_running_jobs 1): the second starts after the first has run, whether the ETA comes from
    # the pipeline's simulation (once the DiT has reported its pass cost) or from position x avg_job_seconds.
    assert 0 < client.get(f"/v1/jobs/{first.json()['job_id']}").json()["eta_seconds"] < view["eta_seconds"]
    assert view["progress"]["stage"] == "queued"

    before = client.get("/v1/stats").json()["jobs"]["total"]
    rejected = submit(client, json={"caption": "one too many"})
    assert rejected.status_code == 429
    assert rejected.json() == {"detail": "Server busy: queue is full"}
    assert int(rejected.headers["Retry-After"]) >= 1
    assert client.get("/v1/stats").json()["jobs"]["total"] == before

    doomed_source.unlink()  # the queued repaint job will find its source gone
    failed = wait_for(client, first.json()["job_id"])
    assert failed["status"] == "failed" and failed["result"] is None
    assert failed["error"].startswith("encode_audio: ") and "\n" not in failed["error"]
    assert wait_for(client, blocker)["status"] == "succeeded"
    assert wait_for(client, second.json()["job_id"])["status"] == "succeeded"
    # FIFO: the second job started only after the first one ended.
    assert client.get(f"/v1/jobs/{second.json()['job_id']}").json()["started_at"] >= failed["finished_at"]
