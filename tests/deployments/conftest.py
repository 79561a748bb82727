from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import deploy


@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("acestep")
    paths = {name: root / name for name in ("results", "uploads", "inputs", "outside", "lora")}
    for path in paths.values():
        path.mkdir()
    paths["journal"] = root / "registry.sqlite3"
    return paths


@pytest.fixture(scope="session")
def api(serve_http, dirs) -> str:
    """The tiny-preset app as `serve_config.yaml` would run it, with test directories and a 2 MB upload limit."""
    args = {
        "name": "api-test",
        "model": {"lora_dir": str(dirs["lora"])},
        "queue": {"max_queued_jobs": 50, "max_running_jobs": 4, "default_duration_s": 2.0},
        "files": {"output_dir": str(dirs["results"]), "upload_dir": str(dirs["uploads"]),
                  "allowed_input_dirs": [str(dirs["inputs"])], "max_upload_bytes": 2 * 1024 * 1024,
                  "journal_path": str(dirs["journal"])},
    }
    return deploy(args, "api-test", "/", serve_http)


@pytest.fixture(scope="session")
def client(api):
    with httpx.Client(base_url=api, timeout=30) as c:
        yield c


def wait_for(client: httpx.Client, job_id: str, timeout: float = 180.0, history: list | None = None) -> dict:
    """Poll until the job is terminal; `history` collects every view seen."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if history is not None:
            history.append(view)
        if view["status"] in ("succeeded", "failed", "canceled"):
            return view
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} not finished after {timeout} s: {view}")


def submit(client: httpx.Client, **kwargs) -> httpx.Response:
    return client.post("/v1/music/generate", **kwargs)


def run_job(client: httpx.Client, payload: dict) -> dict:
    response = submit(client, json=payload)
    assert response.status_code == 200, response.text
    view = wait_for(client, response.json()["job_id"])
    assert view["status"] == "succeeded", view
    return view
