"""Hostile input (a property test over the request body) and bounded load on loopback: no 5xx, nothing lost or
leaked."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import psutil
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.schemas import ALIASES, NESTED_KEYS, GenerateRequest
from tests.conftest import deployed, wav_bytes

KEYS = sorted({*GenerateRequest.model_fields, *(a for names in ALIASES.values() for a in names), *NESTED_KEYS})
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(KEYS), children, max_size=4),
    max_leaves=12)
BODIES = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=12), JSON_VALUES, max_size=8)


@pytest.fixture(scope="module")
def hostile(serve_http, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    args = {"name": "hostile-test", "queue": {"max_queued_jobs": 8, "max_running_jobs": 2, "default_duration_s": 1},
            "files": {"output_dir": str(root / "results"), "upload_dir": str(root / "uploads"),
                      "journal_path": str(root / "registry.sqlite3"), "max_upload_bytes": 1024 * 1024}}
    with deployed(args, "hostile-test", "/h", serve_http) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, root


def check_answer(client, response) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    if response.status_code == 200:
        client.post(f"/v1/jobs/{body['job_id']}/cancel")  # nothing to prove by running it
    else:
        assert isinstance(body["detail"], str) and body["detail"]


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES)
def test_fuzzed_json_bodies_never_5xx(hostile, body):
    client, _ = hostile
    content = json.dumps(body, allow_nan=True).encode()
    check_answer(client, client.post("/v1/music/generate", content=content,
                                     headers={"Content-Type": "application/json"}))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=st.dictionaries(st.sampled_from(KEYS), st.text(max_size=30), max_size=8),
       upload=st.sampled_from([None, b"", b"garbage", "wav", "cut"]))
def test_fuzzed_forms_and_uploads_never_5xx(hostile, fields, upload):
    client, _ = hostile
    files = None
    if upload is not None:
        data = {"wav": wav_bytes(0.2), "cut": wav_bytes(0.2)[:100]}.get(upload, upload)
        files = {"src_audio": ("x.wav", data, "audio/wav")}
    check_answer(client, client.post("/v1/music/generate", data=fields, files=files))


def ray_rss_bytes() -> int:
    total = 0
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any("ray" in part for part in (process.info["cmdline"] or [])[:3]):
                total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def test_bounded_load_loses_and_leaks_nothing(hostile):
    """500 submissions from 32 concurrent clients against a queue of 8: each is accepted and ends, or is a 429
    with Retry-After that left no record; uploads, file descriptors and memory come back down."""
    client, root = hostile
    ingress = [a for a in ray.util.list_named_actors(all_namespaces=True) if "hostile-test#Ingress" in a["name"]]
    ingress_pid = ray.get(ray.get_actor(ingress[0]["name"], namespace=ingress[0]["namespace"])
                          .__ray_call__.remote(lambda self: __import__("os").getpid()))
    fds_before = psutil.Process(ingress_pid).num_fds()
    jobs_before = client.get("/v1/stats").json()["jobs"]["total"]
    rss_before = ray_rss_bytes()
    upload = wav_bytes(0.3)

    def one(i: int) -> tuple[int, str | None, str | None]:
        with httpx.Client(base_url=str(client.base_url), timeout=60) as c:
            if i % 10 == 0:  # some with an upload: its temp file must go whatever happens to the job
                r = c.post("/v1/music/generate", data={"task_type": "repaint", "batch_size": "1",
                                                       "inference_steps": "1"},
                           files={"src_audio": ("s.wav", upload, "audio/wav")})
            else:
                r = c.post("/v1/music/generate", json={"caption": f"load {i}", "batch_size": 1,
                                                       "inference_steps": 1, "audio_format": "wav"})
            return r.status_code, r.json().get("job_id"), r.headers.get("retry-after")

    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(500)))
    accepted = [job for status, job, _ in answers if status == 200]
    rejected = [(status, retry) for status, _, retry in answers if status != 200]
    assert all(status == 429 and retry and int(retry) >= 1 for status, retry in rejected), rejected[:3]
    assert accepted and rejected
    outcomes = {}
    for job in accepted:
        deadline = time.time() + 300
        while (view := client.get(f"/v1/jobs/{job}").json())["status"] not in ("succeeded", "failed"):
            assert time.time() < deadline, view
            time.sleep(0.1)
        outcomes[view["status"]] = outcomes.get(view["status"], 0) + 1
    assert outcomes == {"succeeded": len(accepted)}
    stats = client.get("/v1/stats").json()
    assert stats["jobs"]["total"] - jobs_before == len(accepted), "a rejected submission left a record"
    assert list((root / "uploads").iterdir()) == []
    fds_after = psutil.Process(ingress_pid).num_fds()
    assert fds_after <= fds_before + 10, (fds_before, fds_after)
    rss_after = ray_rss_bytes()
    print(f"\nload: {len(answers)} submitted, {len(accepted)} accepted and completed, {len(rejected)} rejected "
          f"with 429, in {time.time() - start:.1f} s; Ray RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB;"
          f" ingress fds {fds_before} -> {fds_after}")
    assert rss_after < rss_before + 1024 * 2**20, "memory grew by more than 1 GiB"
