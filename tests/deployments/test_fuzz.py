"""Schemathesis (the CLI, as the issue ran it) against the app's own /openapi.json for a bounded time: no 5xx, every
answer's status and body as published, schema-violating requests refused; afterwards the app is ready and works."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.conftest import deployed

CHECKS = ("not_a_server_error", "status_code_conformance", "response_schema_conformance", "negative_data_rejection")
MAX_TIME_S = 60
# One worker: on CPython 3.11.7, ast.parse in two threads at once (hypothesis describing a filter lambda) can raise
# "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905), a fuzzer crash, not a finding.
WORKERS = 1
# negative_data_rejection's default list lacks 413: a body over the server's byte limit is refused, as it should be.
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
"""


@pytest.fixture(scope="module")
def fuzz_app(serve_http, tmp_path_factory):
    """Small limits, so the jobs the fuzzer gets accepted stay cheap on a 2-core box."""
    root = tmp_path_factory.mktemp("fuzz")
    args = {"name": "fuzz-test",
            "queue": {"max_queued_jobs": 4, "max_running_jobs": 2, "default_duration_s": 1, "max_duration_s": 10,
                      "max_outputs_per_job": 2},
            "files": {"output_dir": str(root / "results"), "upload_dir": str(root / "uploads"),
                      "journal_path": str(root / "registry.sqlite3"), "max_upload_bytes": 256 * 1024,
                      "max_body_bytes": 64 * 1024}}
    with deployed(args, "fuzz-test", "/fuzz", serve_http) as url:
        yield url


def test_openapi_errors_are_one_line_details(fuzz_app):
    """Every error status is documented as ErrorResponse (`{"detail": "..."}`), 422 included; empty values are
    published as accepted (upstream's "use the default")."""
    spec = httpx.get(f"{fuzz_app}/openapi.json", timeout=30).json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
    body = spec["paths"]["/v1/music/generate"]["post"]["requestBody"]["content"]
    for media in body.values():
        assert {"const": ""} in media["schema"]["properties"]["audio_format"]["anyOf"]
    answer = httpx.post(f"{fuzz_app}/v1/music/generate", data={"audio_format": "", "batch_size": "1"}, timeout=30)
    assert answer.status_code == 200, answer.text
    httpx.post(f"{fuzz_app}/v1/jobs/{answer.json()['job_id']}/cancel", timeout=30)


def replicas_rss_bytes(app: str) -> int:
    """Resident memory of the app's replicas (not of other Ray clusters on this box)."""
    total = 0
    for process in psutil.process_iter(["cmdline"]):
        try:
            if f"ServeReplica:{app}:" in " ".join(process.info["cmdline"] or []):
                total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def failures(report_dir) -> list[str]:
    """One line per distinct failure in schemathesis' NDJSON report: check, operation, request and answer."""
    lines, seen = [], set()
    for report in report_dir.glob("*.ndjson"):
        for line in report.read_text().splitlines():
            scenario = json.loads(line).get("ScenarioFinished")
            if not scenario:
                continue
            recorder = scenario["recorder"]
            for case_id, checks in recorder.get("checks", {}).items():
                for check in checks:
                    if check["status"] != "failure":
                        continue
                    failure = check["failure_info"]["failure"]
                    key = (check["name"], failure["operation"], failure["message"].split("\n")[0])
                    if key in seen:
                        continue
                    seen.add(key)
                    exchange = recorder.get("interactions", {}).get(case_id) or {}
                    request, response = exchange.get("request") or {}, exchange.get("response") or {}
                    sent, got = request.get("body"), response.get("content")
                    sent = base64.b64decode(sent["$base64"]) if isinstance(sent, dict) else sent
                    got = base64.b64decode(got["$base64"]) if isinstance(got, dict) else got
                    lines.append(f"{check['name']} {failure['operation']}: {failure['message'][:300]!r}; "
                                 f"sent {request.get('uri')} {request.get('headers', {}).get('Content-Type')} "
                                 f"{(sent or b'')[:200]!r}; got {response.get('status_code')} {(got or b'')[:200]!r}")
    return lines


def test_schemathesis_finds_nothing_and_the_app_survives(fuzz_app, tmp_path):
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    command = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
               "--config-file", str(tmp_path / "schemathesis.toml"), "run", f"{fuzz_app}/openapi.json",
               "--checks", ",".join(CHECKS), "--workers", str(WORKERS), "--max-time", str(MAX_TIME_S),
               "--request-timeout", "30", "--continue-on-failure", "--generation-database", "none",
               "--no-color", "--report", "ndjson", "--report-dir", str(tmp_path / "report")]
    rss_before = replicas_rss_bytes("fuzz-test")
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=MAX_TIME_S + 90)
    output = run.stdout + run.stderr
    found = failures(tmp_path / "report")
    assert not found, "\n".join(found[:20]) + "\n" + output[-3000:]
    assert run.returncode == 0, output[-6000:]
    assert "Stateful" in output and "API Links:" in output, output[-3000:]  # every phase ran, links included

    with httpx.Client(base_url=fuzz_app, timeout=30) as client:
        assert client.get("/readyz").status_code == 200
        deadline = time.time() + 120  # the queue may still hold fuzzed jobs: wait our turn as a client would
        while (submitted := client.post("/v1/music/generate", json={
                "caption": "after the fuzzer", "audio_duration": 1, "inference_steps": 2, "batch_size": 1,
                "audio_format": "wav"})).status_code == 429 and time.time() < deadline:
            time.sleep(float(submitted.headers.get("retry-after", "1")))
        assert submitted.status_code == 200, submitted.text
        job_id = submitted.json()["job_id"]
        while (view := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.time() < deadline + 120, view
            time.sleep(0.2)
        assert view["status"] == "succeeded", view
        audio = client.get(view["result"]["audio_paths"][0])
        assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
    rss_after = replicas_rss_bytes("fuzz-test")
    summary = [line for line in output.splitlines() if " generated, " in line or line.startswith("Seed:")]
    print(f"\nschemathesis: {' '.join(s.strip() for s in summary)}; replicas' RSS {rss_before / 2**20:.0f} -> "
          f"{rss_after / 2**20:.0f} MiB")
    assert rss_after < rss_before + 1024 * 2**20, "memory grew by more than 1 GiB"
