"""Our module loggers reach the Serve replica log files (logs/serve/replica_<app>_<deployment>_<id>.log) at INFO."""

from __future__ import annotations

import glob
import os
import time

import ray

from tests.deployments.conftest import run_job


def logs_dir() -> str:
    return ray._private.worker._global_node.get_logs_dir_path()


def wait_for_line(pattern: str, needle: str, timeout: float = 30.0) -> tuple[str, str]:
    """The first (file, line) among files matching `pattern` that holds `needle` (files flush asynchronously)."""
    deadline = time.time() + timeout
    while True:
        for path in glob.glob(os.path.join(logs_dir(), pattern)):
            with open(path, errors="replace") as f:
                for line in f:
                    if needle in line:
                        return path, line
        if time.time() > deadline:
            files = glob.glob(os.path.join(logs_dir(), pattern))
            raise AssertionError(f"{needle!r} not in any of {pattern} after {timeout} s: {files}")
        time.sleep(0.2)


def replica_id(path: str, deployment: str) -> str:
    """`replica_api-test_JobDriver_<id>.log` -> `<id>`."""
    return os.path.basename(path).rsplit(f"_{deployment}_", 1)[1].removesuffix(".log")


def test_job_lines_reach_the_replica_logs(client):
    job_id = run_job(client, {"caption": "logged", "audio_duration": 1.0, "batch_size": 1,
                              "inference_steps": 2})["job_id"]

    for deployment, text in (("JobDriver", "s of audio; stage seconds"), ("DiT", "after the DiT")):
        path, line = wait_for_line(os.path.join("serve", f"replica_*_{deployment}_*.log"), f"job {job_id}")
        # Serve's TEXT format: "<LEVEL> <time> <app>_<deployment> <replica id> [<request id>] -- <message>"
        assert text in line, line
        level, _, _, component, replica, *_ = line.split(" -- ", 1)[0].split()
        assert component.endswith(f"_{deployment}") and replica == replica_id(path, deployment), line
        assert level == "INFO", line

    # The registry actor is no Serve replica: its lines go to its own worker log.
    _, line = wait_for_line("worker-*", f"job {job_id} succeeded")
    assert "INFO jobs.registry" in line, line
