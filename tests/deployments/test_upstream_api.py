"""Upstream ACE-Step 1.5's current API ("v2": /release_task, /query_result, the envelope) over real HTTP against the
real Serve app (tiny preset), on the same jobs as the seed API; and its parts without a server."""

from __future__ import annotations

import hashlib
import io
import json
import time

from typing import Any

import httpx
import pytest
import soundfile as sf
from fastapi import HTTPException

from deployments import upstream_api
from tests.conftest import deployed, wav_bytes
from tests.deployments.conftest import run_job, wait_for

ENVELOPE = {"data", "code", "error", "timestamp", "extra"}
QUERY_KEYS = {"task_id", "status", "result", "progress_text", "progress", "stage", "error"}
ITEM_KEYS = {"file", "wave", "status", "create_time", "env", "prompt", "lyrics", "metas", "generation_info",
             "seed_value", "lm_model", "dit_model", "progress", "stage", "error"}
METAS_KEYS = {"bpm", "duration", "genres", "keyscale", "timesignature"}
KEY = "v2-s3cret"


def enveloped(response: httpx.Response, code: int = 200) -> dict:
    """The envelope of an answer with HTTP status `code`, checked; its `data`."""
    assert response.status_code == code, response.text
    body = response.json()
    assert ENVELOPE <= set(body) and body["code"] == code and body["extra"] is None
    assert abs(body["timestamp"] - time.time() * 1000) < 60_000
    if code == 200:
        assert body["error"] is None
    else:  # the envelope's error, and the `detail` every error of the service carries
        assert body["data"] is None and isinstance(body["error"], str) and body["detail"] == body["error"]
    return body["data"] if code == 200 else body


def release(client: httpx.Client, **kwargs) -> str:
    data = enveloped(client.post("/release_task", **kwargs))
    assert set(data) == {"task_id", "status", "queue_position"}
    assert data["status"] == "queued" and data["queue_position"] >= 1
    return data["task_id"]


def query(client: httpx.Client, task_ids, **kwargs) -> list[dict]:
    """`/query_result` for `task_ids` (a list sent as a JSON array; a string sent as it is)."""
    if "data" in kwargs:  # a form: task_id_list is a string holding the array
        kwargs["data"] = {"task_id_list": json.dumps(task_ids), **kwargs["data"]}
    else:
        kwargs["json"] = {"task_id_list": task_ids, **kwargs.get("json", {})}
    data = enveloped(client.post("/query_result", **kwargs))
    assert [item["task_id"] for item in data] == (task_ids if isinstance(task_ids, list) else json.loads(task_ids))
    for item in data:
        assert set(item) == QUERY_KEYS and item["status"] in (0, 1, 2) and 0.0 <= item["progress"] <= 1.0
        assert all(set(entry) == ITEM_KEYS for entry in json.loads(item["result"]))
    return data


def wait_v2(client: httpx.Client, task_id: str, timeout: float = 180.0, **kwargs) -> dict:
    """Poll /query_result as an upstream client does until the status is 1 or 2; statuses only move forward."""
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        [item] = query(client, [task_id], **kwargs)
        seen.append(item["status"])
        if item["status"] != 0:
            assert seen == sorted(seen)
            return item
        time.sleep(0.2)
    raise TimeoutError(f"task {task_id} not finished after {timeout} s")


def files_of(item: dict) -> list[dict]:
    """The per-file result items of a succeeded task, each downloaded and checked to be 48 kHz stereo audio."""
    assert item["status"] == 1 and item["stage"] == "succeeded" and item["progress"] == 1.0 and item["error"] is None
    entries = json.loads(item["result"])
    for entry in entries:
        assert entry["status"] == 1 and entry["wave"] == "" and isinstance(entry["create_time"], int)
        assert METAS_KEYS <= set(entry["metas"]) and entry["dit_model"] == "acestep-v15-tiny"
        assert entry["file"].startswith("/v1/audio?path=")
    return entries


def audio_info(client: httpx.Client, url: str) -> Any:
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"].startswith("audio/")
    info = sf.info(io.BytesIO(response.content))
    assert (info.samplerate, info.channels) == (48000, 2)
    return info


# -- the upstream client flow -------------------------------------------------------------------------------------
def test_json_submit_poll_download_and_the_same_job_in_the_seed_api(client):
    task_id = release(client, json={"prompt": "upbeat pop", "lyrics": "[verse]\nhello", "audio_duration": 1,
                                    "inference_steps": 2, "batch_size": 2, "audio_format": "wav",
                                    "use_random_seed": False, "seed": "11,12"})
    item = wait_v2(client, task_id)
    entries = files_of(item)
    assert len(entries) == 2 and len({e["file"] for e in entries}) == 2
    for entry in entries:
        assert (entry["prompt"], entry["lyrics"], entry["seed_value"]) == ("upbeat pop", "[verse]\nhello", "11,12")
        assert entry["metas"]["duration"] == 1.0 and entry["generation_info"].startswith("Steps: 2,")
        assert abs(audio_info(client, entry["file"]).duration - 1.0) < 0.01
    view = client.get(f"/v1/jobs/{task_id}").json()  # a v2 job is a job of the seed API too
    assert view["status"] == "succeeded" and view["result"]["seed_value"] == "11,12"
    assert view["result"]["audio_paths"] == [e["file"] for e in entries]


def test_form_with_upstream_spellings_and_a_string_task_id_list(client):
    task_id = release(client, data={"caption": "form", "audioDuration": "1.5", "inferenceSteps": "2",
                                    "batchSize": "1", "useRandomSeed": "false", "seed": "7",
                                    "metas": json.dumps({"bpm": 100, "keyScale": "D minor", "timeSignature": "3"})})
    item = wait_v2(client, task_id, data={})  # form bodies: task_id_list='["<id>"]'
    [entry] = files_of(item)
    assert entry["seed_value"] == "7" and entry["prompt"] == "form"
    assert (entry["metas"]["bpm"], entry["metas"]["keyscale"], entry["metas"]["timesignature"]) == (100, "D minor",
                                                                                                    "3")
    assert abs(audio_info(client, entry["file"]).duration - 1.5) < 0.01
    [again] = query(client, json.dumps([task_id]))  # a JSON body whose task_id_list is a string holding the array
    assert again["result"] == item["result"]


def test_multipart_with_an_uploaded_source(client, dirs):
    task_id = release(client, data={"prompt": "repaint me", "task_type": "repaint", "repainting_start": "0.2",
                                    "batch_size": "1", "audio_format": "flac", "inference_steps": "2"},
                      files={"ctx_audio": ("song.wav", wav_bytes(1.0, 44100, 1), "audio/wav")})  # = src_audio
    [entry] = files_of(wait_v2(client, task_id))
    assert audio_info(client, entry["file"]).frames == 48000  # the source's length is the job's
    assert not (dirs["uploads"] / task_id).exists()
    bad = client.post("/release_task", data={"task_type": "cover"},
                      files={"ref_audio": ("r.wav", b"not audio at all", "audio/wav")})  # = reference_audio
    assert enveloped(bad, 400)["error"].startswith("reference_audio:")


def test_a_seed_job_is_a_v2_task_too(client):
    view = run_job(client, {"caption": "seed era", "audio_duration": 1, "batch_size": 2, "inference_steps": 1})
    [item] = query(client, [view["job_id"]])
    entries = files_of(item)
    assert [e["file"] for e in entries] == view["result"]["audio_paths"]
    assert all(e["seed_value"] == view["result"]["seed_value"] and e["prompt"] == "seed era" for e in entries)


def test_unknown_ids_are_failed_with_a_reason_and_answers_keep_the_order(client):
    known = run_job(client, {"caption": "k", "audio_duration": 1, "batch_size": 1, "inference_steps": 1})["job_id"]
    unknown = "00000000-0000-0000-0000-000000000000"
    items = query(client, [unknown, known, "x" * 500, known])
    assert [item["status"] for item in items] == [2, 1, 2, 1]
    for item in (items[0], items[2]):
        assert item["error"].startswith("unknown task_id") and item["progress_text"] == item["error"]
        assert json.loads(item["result"])[0]["error"] == item["error"]
    assert query(client, []) == []
    assert enveloped(client.post("/query_result", json={})) == []  # upstream's default: no ids


# -- errors: 4xx in the envelope on the v2 routes, never a 500 -----------------------------------------------------
@pytest.mark.parametrize("payload,status,field", [
    ({"inference_steps": 0}, 422, "inference_steps"),
    ({"duration": 1e9}, 422, "audio_duration"),
    ({"audio_format": "xyz"}, 400, "audio_format"),
    ({"task_type": "karaoke"}, 400, "task_type"),
    ({"task_type": "lego"}, 400, "turbo variant"),  # a task this (turbo) model does not serve
    ({"model": "acestep-v15-unknown"}, 400, "model"),
    ({"seed": "1,x", "use_random_seed": False}, 422, "seed"),
    ({"seed": "1,2,3", "batch_size": 2}, 422, "seed"),
    ({"sample_mode": True}, 400, "sample_mode"),
    ({"sample_query": "a soft love song"}, 400, "sample_query"),
    ({"task_type": "repaint"}, 400, "src_audio"),
])
def test_bad_values_are_4xx_in_the_envelope(client, payload, status, field):
    body = enveloped(client.post("/release_task", json=payload), status)
    assert field in body["error"]


@pytest.mark.parametrize("content,headers,status", [
    (b"{bad json", {"Content-Type": "application/json"}, 400),
    (b"[1, 2]", {"Content-Type": "application/json"}, 400),
    (b"hello", {"Content-Type": "text/plain"}, 415),
])
@pytest.mark.parametrize("path", ["/release_task", "/query_result"])
def test_malformed_bodies_are_4xx_in_the_envelope(client, path, content, headers, status):
    enveloped(client.post(path, content=content, headers=headers), status)


@pytest.mark.parametrize("task_id_list", ["not json", 5, [1, 2], '{"a": 1}', ["x"] * 101])
def test_malformed_task_id_list_is_400_in_the_envelope(client, task_id_list):
    body = enveloped(client.post("/query_result", json={"task_id_list": task_id_list}), 400)
    assert body["error"].startswith("task_id_list:")


def test_a_task_id_that_cannot_be_echoed_is_400_not_500(client):
    body = b'{"task_id_list": ["\\ud800"]}'  # valid JSON; the lone surrogate has no UTF-8 form
    enveloped(client.post("/query_result", content=body, headers={"Content-Type": "application/json"}), 400)


def test_the_seed_routes_keep_their_error_shape(client):
    assert client.post("/v1/music/generate", json={"inference_steps": 0}).json().keys() == {"detail"}


# -- paths both APIs share: one shape both kinds of client read ----------------------------------------------------
def test_shared_paths_carry_both_shapes(client):
    deadline = time.time() + 60
    while client.get("/readyz").status_code != 200:  # models_initialized and is_loaded say "ready"
        assert time.time() < deadline
        time.sleep(0.5)
    health = client.get("/health").json()
    assert {k: health[k] for k in ("status", "service", "version")} == {"status": "ok", "service": "ACE-Step API",
                                                                        "version": "1.0"}
    data = enveloped(client.get("/health"))
    assert data == {"status": "ok", "service": "ACE-Step API", "version": "1.0", "models_initialized": True,
                    "llm_initialized": False, "loaded_model": "acestep-v15-tiny", "loaded_lm_model": None}

    models = client.get("/v1/models").json()
    listed = {"models": [{"name": "acestep-v15-tiny", "is_default": True,
                          "supported_task_types": ["text2music", "cover", "repaint"]}],
              "default_model": "acestep-v15-tiny"}
    assert {k: models[k] for k in listed} == listed and enveloped(client.get("/v1/models")) == listed

    stats = client.get("/v1/stats").json()
    assert {"jobs", "queue_size", "queue_maxsize", "avg_job_seconds", "replicas"} <= set(stats)
    data = enveloped(client.get("/v1/stats"))
    assert set(data) == {"jobs", "queue_size", "queue_maxsize", "avg_job_seconds"}
    assert {"total", "queued", "running", "succeeded", "failed"} <= set(data["jobs"])
    assert data["queue_maxsize"] == stats["queue_maxsize"] == 50

    inventory = enveloped(client.get("/v1/model_inventory"))
    assert inventory == {"models": [{"name": "acestep-v15-tiny", "is_default": True, "is_loaded": True,
                                     "supported_task_types": ["text2music", "cover", "repaint"]}],
                         "default_model": "acestep-v15-tiny", "lm_models": [], "loaded_lm_model": None,
                         "llm_initialized": False}
    spec = client.get("/openapi.json").json()
    assert {"/release_task", "/query_result", "/v1/model_inventory"} <= set(spec["paths"])
    assert "ai_token" in spec["paths"]["/release_task"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]


# -- API keys (Bearer or ai_token), a full queue and cancel, on an app with keys and a one-job queue -----------------
@pytest.fixture(scope="module")
def keyed(serve_http, tmp_path_factory):
    root = tmp_path_factory.mktemp("v2keys")
    args = {"name": "v2-keys",
            "queue": {"max_queued_jobs": 1, "max_running_jobs": 1, "default_duration_s": 1},
            "files": {"output_dir": str(root / "results"), "upload_dir": str(root / "uploads"),
                      "journal_path": str(root / "registry.sqlite3")},
            "auth": {"api_key_sha256": [hashlib.sha256(KEY.encode()).hexdigest()]}}
    with deployed(args, "v2-keys", "/v2keys", serve_http) as url, \
            httpx.Client(base_url=url, timeout=30) as anonymous, \
            httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as bearer:
        yield anonymous, bearer


def test_ai_token_in_the_body_is_the_key_on_the_v2_routes(keyed):
    anonymous, bearer = keyed
    tiny = {"prompt": "keyed", "duration": 1, "batch_size": 1, "inference_steps": 1}
    for token in ({}, {"ai_token": "wrong"}, {"ai_token": 5}):
        response = anonymous.post("/release_task", json={**tiny, **token})
        assert enveloped(response, 401)["error"] == "Missing or invalid API key"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    for body in (b"{bad", b'{"ai_token": "\\ud800"}'):  # nothing about the body to a client without a key
        enveloped(anonymous.post("/release_task", content=body, headers={"Content-Type": "application/json"}), 401)
    task_id = release(anonymous, json={**tiny, "ai_token": KEY})
    enveloped(anonymous.post("/query_result", json={"task_id_list": [task_id]}), 401)
    assert files_of(wait_v2(anonymous, task_id, json={"ai_token": KEY}))
    task_id = release(anonymous, data={"prompt": "form", "duration": "1", "batch_size": "1", "ai_token": KEY})
    assert files_of(wait_v2(anonymous, task_id, data={"ai_token": KEY}))
    assert wait_v2(bearer, release(bearer, json=tiny))["status"] == 1  # the header works too

    # ai_token is upstream's and only its routes read it; other routes answer 401 in their own shape
    response = anonymous.post("/v1/music/generate", json={**tiny, "ai_token": KEY})
    assert response.status_code == 401 and response.json() == {"detail": "Missing or invalid API key"}
    enveloped(anonymous.get("/v1/model_inventory"), 401)
    assert enveloped(bearer.get("/v1/model_inventory"))["models"][0]["is_default"] is True
    assert anonymous.get("/health").status_code == 200


def test_full_queue_is_429_in_the_envelope_without_a_record_and_cancel_is_status_2(keyed):
    _, client = keyed
    blocker = release(client, json={"prompt": "long", "duration": 60, "batch_size": 1, "inference_steps": 8})
    deadline = time.time() + 60
    while client.get(f"/v1/jobs/{blocker}").json()["status"] != "running":
        assert time.time() < deadline
        time.sleep(0.05)
    [running] = query(client, [blocker])
    assert running["status"] == 0 and running["stage"] != "queued" and running["progress_text"].startswith("running")
    queued = release(client, json={"prompt": "waits", "duration": 1, "batch_size": 1})
    [waiting] = query(client, [queued])
    assert (waiting["status"], waiting["stage"], waiting["progress"]) == (0, "queued", 0.0)
    assert waiting["progress_text"].startswith("queued: position 1")

    before = client.get("/v1/stats").json()["jobs"]["total"]
    rejected = client.post("/release_task", json={"prompt": "one too many"})
    assert enveloped(rejected, 429)["error"] == "Server busy: queue is full"
    assert int(rejected.headers["Retry-After"]) >= 1
    assert client.get("/v1/stats").json()["jobs"]["total"] == before  # no record left behind

    for task_id in (queued, blocker):
        assert client.post(f"/v1/jobs/{task_id}/cancel").json()["status"] == "canceled"
    for item in query(client, [blocker, queued]):
        assert (item["status"], item["stage"], item["error"]) == (2, "canceled", "canceled by the client")
        assert json.loads(item["result"])[0]["error"] == "canceled by the client"
    assert wait_for(client, blocker)["status"] == "canceled"


# -- without a server ---------------------------------------------------------------------------------------------
def test_progress_follows_the_stages():
    view = {"job_id": "j", "status": "running", "created_at": 1.0, "queue_position": 0, "eta_seconds": None,
            "result": None, "error": None, "progress": {"stage": "diffusion", "step": 4, "total": 8}}
    item = upstream_api.query_item("j", view)
    assert (item["status"], item["stage"], item["progress_text"]) == (0, "diffusion", "running: diffusion step 4/8")
    stages = ["queued", "starting", "condition", "diffusion", "decode", "write"]
    progress = [upstream_api.query_item("j", {**view, "progress": {"stage": s, "step": 0, "total": 8}})["progress"]
                for s in stages]
    assert progress == sorted(progress) and progress[0] == 0.0 and progress[-1] < 1.0
    assert progress[3] < item["progress"] < progress[4]


def test_unsupported_upstream_parameters_are_named():
    upstream_api.check_supported({"thinking": True, "use_format": True, "sample_mode": True, "description": "x",
                                  "analysis_only": "false"})  # the LM's fields are the ingress's to check
    for raw in ({"analysis_only": "true"}, {"fullAnalysisOnly": True}, {"extract_codes_only": 1}):
        with pytest.raises(HTTPException) as info:
            upstream_api.check_supported(raw)
        assert info.value.status_code == 400 and next(iter(raw)) in info.value.detail
