"""The README's `ray start` path, for real: a head-only cluster, `serve deploy serve_config.yaml`, a job over HTTP."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.deployments.conftest import run_job

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_cluster(tmp_path):
    """`ray start --head` in its own session, so that exactly its processes can be stopped afterwards."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    log = open(tmp_path / "ray_start.log", "w+")  # not a pipe: the daemons would hold it open
    start = subprocess.Popen(
        [BIN / "ray", "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--num-cpus=8",
         "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, cwd=tmp_path, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    session = start.pid  # every daemon `ray start` launches inherits this session id
    try:
        start.wait(timeout=120)
        log.seek(0)
        assert start.returncode == 0, log.read()
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _pids_in_session(session):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)
        shutil.rmtree(temp_dir, ignore_errors=True)
        log.close()


def _pids_in_session(session: int) -> list[int]:
    rows = [line.split() for line in subprocess.run(["ps", "-eo", "pid,sid"], capture_output=True,
                                                    text=True).stdout.splitlines()[1:]]
    return [int(pid) for pid, sid in rows if int(sid) == session and int(pid) != os.getpid()]


@pytest.mark.integration
def test_serve_deploy_on_a_ray_start_cluster(ray_cluster, tmp_path):
    env, dashboard = ray_cluster
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["files"].update(output_dir=str(tmp_path / "results"),
                                                      upload_dir=str(tmp_path / "uploads"),
                                                      journal_path=str(tmp_path / "registry.sqlite3"))
    config["applications"][0]["args"]["queue"]["default_duration_s"] = 1.0
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))

    deploy = subprocess.run([BIN / "serve", "deploy", str(path), "-a", dashboard], env=env, capture_output=True,
                            text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    deadline = time.time() + 180
    status = ""
    while "RUNNING" not in status.split("applications:")[-1].split("deployments:")[0]:
        assert time.time() < deadline, status
        time.sleep(2)
        status = subprocess.run([BIN / "serve", "status", "-a", dashboard], env=env, capture_output=True,
                                text=True, timeout=60).stdout
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        view = run_job(client, {"caption": "cluster", "batch_size": 1, "audio_format": "wav"})
        audio = client.get(view["result"]["first_audio_path"])
        assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
    assert (tmp_path / "results").is_dir()

    # A redeploy with two DiT replicas (2 jobs each at most) and another output_dir: the registry, which outlived
    # the first deploy, writes where the current config says.
    app = config["applications"][0]
    app["args"]["files"]["output_dir"] = str(tmp_path / "results-2")
    dit = next(d for d in app["deployments"] if d["name"] == "DiT")
    dit.pop("autoscaling_config")
    dit.update(num_replicas=2, max_ongoing_requests=2, graceful_shutdown_timeout_s=1,
               user_config={**dit["user_config"], "max_batch_size": 2})
    redeploy(path, config, dashboard, env)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        until_dit_replicas(client, 2)
        jobs = [client.post("/v1/music/generate", json={"caption": f"drain {i}", "audio_duration": 60,
                                                         "inference_steps": 200, "batch_size": 1}).json()["job_id"]
                for i in range(4)]
        deadline = time.time() + 120
        while any(client.get(f"/v1/jobs/{j}").json()["progress"]["stage"] != "diffusion" for j in jobs):
            assert time.time() < deadline, "the 4 jobs never all reached the DiT"
            time.sleep(0.2)
        # Scale the DiT down mid-job: the replica that goes away has 2 jobs in flight, and is given 1 s to drain.
        dit["num_replicas"] = 1
        redeploy(path, config, dashboard, env)
        for job in jobs:
            deadline = time.time() + 300
            while (view := client.get(f"/v1/jobs/{job}").json())["status"] in ("queued", "running"):
                assert time.time() < deadline, view
                time.sleep(0.5)
            assert view["status"] == "succeeded", view
            assert view["attempts"] == 1, view  # handed back to the other replica, no attempt spent
            assert (tmp_path / "results-2" / job).is_dir()
        until_dit_replicas(client, 1)


def redeploy(path: Path, config: dict, dashboard: str, env: dict) -> None:
    path.write_text(yaml.safe_dump(config))
    deploy = subprocess.run([BIN / "serve", "deploy", str(path), "-a", dashboard], env=env, capture_output=True,
                            text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr


def until_dit_replicas(client: httpx.Client, replicas: int, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while client.get("/v1/stats").json()["replicas"].get("DiT") != replicas:
        assert time.time() < deadline, client.get("/v1/stats").json()["replicas"]
        time.sleep(0.5)
