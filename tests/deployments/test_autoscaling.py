"""Autoscaling sees the registry's backlog: a burst of jobs scales the DiT stage from 1 to >= 2 replicas, dispatch
grows with the new replica's slots, and the stage scales back down once the burst is over."""

from __future__ import annotations

import time

import httpx
from ray import serve

from tests.conftest import deployed
from tests.deployments.conftest import submit, wait_for

APP = "scale-test"
# One DiT replica holds 2 jobs; the rest of a burst waits in the registry, where only backlog_policy sees it.
OPTIONS = {"DiT": {"max_ongoing_requests": 4, "user_config": {"max_batch_size": 2},
                   "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
                                          "upscale_delay_s": 0.5, "downscale_delay_s": 3, "look_back_period_s": 1,
                                          "policy": {"policy_function": "deployments.autoscaling:backlog_policy"}}}}


def _dit_replicas() -> int:
    return serve.status().applications[APP].deployments["DiT"].replica_states.get("RUNNING", 0)


def test_a_burst_scales_the_dit_up_and_back_down(serve_http, dirs):
    args = {"name": APP, "queue": {"max_queued_jobs": 100, "default_duration_s": 20},
            "files": {"output_dir": str(dirs["results"]), "upload_dir": str(dirs["uploads"]), "journal_path": None}}
    with deployed(args, APP, "/scale", serve_http, options=OPTIONS) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        assert _dit_replicas() == 1
        jobs = [submit(client, json={"caption": f"burst {i}", "batch_size": 1, "audio_format": "wav",
                                     "inference_steps": 30}).json()["job_id"] for i in range(24)]
        replicas, capacity = [], []
        deadline = time.time() + 240
        while client.get(f"/v1/jobs/{jobs[-1]}").json()["status"] not in ("succeeded", "failed"):
            assert time.time() < deadline, "the burst did not finish"
            replicas.append(_dit_replicas())
            capacity.append(client.get("/v1/stats").json()["running_capacity"])
            time.sleep(0.5)
        assert max(replicas) >= 2, replicas
        assert max(capacity) > capacity[0], capacity  # the new replica's slots were used for dispatch
        assert all(wait_for(client, job_id)["status"] == "succeeded" for job_id in jobs)
        deadline = time.time() + 120
        while _dit_replicas() > 1:
            assert time.time() < deadline, "the DiT did not scale back down after the burst"
            time.sleep(1)
