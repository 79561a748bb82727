"""Prometheus metrics reach Ray's metrics export port, with units in their names."""

from __future__ import annotations

import time

import httpx

from tests.deployments.conftest import run_job

EXPECTED = ["acestep_queue_depth", "acestep_jobs_total", "acestep_job_queue_seconds", "acestep_job_seconds",
            "acestep_stage_seconds", "acestep_stage_batch_size", "acestep_dit_step_seconds",
            "acestep_audio_seconds_generated_total"]


def test_metrics_are_exported(client, metrics_url):
    run_job(client, {"caption": "metrics", "audio_duration": 1, "batch_size": 1, "inference_steps": 2})
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:
        try:
            text = httpx.get(metrics_url, timeout=10).text
        except httpx.HTTPError:  # the exporter starts a few seconds after Ray
            text = ""
        if all(f"ray_{name}" in text for name in EXPECTED):
            break
        time.sleep(2)
    missing = [name for name in EXPECTED if f"ray_{name}" not in text]  # Ray prefixes custom metrics
    assert not missing, f"not exported: {missing}"
    assert 'outcome="succeeded"' in text and 'stage="diffusion"' in text and 'stage="dit"' in text
