"""The 5 Hz language model as a stage, over real HTTP on the tiny LM: `thinking` plans the metadata the user left
empty and writes duration x 5 codes that reach the DiT; user-given metadata is kept; cover skips the LM; cancel
stops it; and a server without an LM refuses what needs one."""

from __future__ import annotations

import io
import time

import httpx
import pytest
import soundfile as sf

from tests.conftest import deployed
from tests.deployments.conftest import submit, wait_for

JOB = {"caption": "a calm piano piece", "batch_size": 1, "inference_steps": 2, "audio_format": "wav",
       "use_random_seed": False, "seed": 7, "thinking": True}


@pytest.fixture(scope="module")
def lm(serve_http, dirs):
    args = {"name": "lm-test", "lm": {"preset": "tiny", "max_duration": 30},
            "queue": {"max_queued_jobs": 20, "max_running_jobs": 8, "default_duration_s": 2.0, "max_duration_s": 60},
            "files": {"output_dir": str(dirs["results"]), "upload_dir": str(dirs["uploads"]),
                      "allowed_input_dirs": [str(dirs["inputs"])], "journal_path": str(dirs["journal"])}}
    with deployed(args, "lm-test", "/lm", serve_http) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def test_thinking_fills_what_the_user_left_empty_and_its_codes_reach_the_dit(lm):
    view = wait_for(lm, submit(lm, json={**JOB, "audio_duration": 2, "bpm": 90}).json()["job_id"])
    assert view["status"] == "succeeded", view
    result = view["result"]
    assert result["lm_model"] == "acestep-5Hz-lm-tiny"
    assert result["lm"]["codes"] == 10  # 2 s x 5 codes
    assert "bpm" not in result["lm"]["fields"] and result["metas"]["bpm"] == 90  # the user's value stays
    assert {"keyscale", "timesignature"} <= set(result["lm"]["fields"])
    assert result["metas"]["keyscale"] != "N/A" and result["metas"]["timesignature"] != "N/A"
    assert "lm" in result["timeline"]["stages"] and result["duration"] == 2.0
    audio, rate = sf.read(io.BytesIO(lm.get(result["first_audio_path"]).content))
    assert (rate, audio.shape) == (48000, (96000, 2))


def test_the_lm_chooses_the_duration_when_none_is_given(lm):
    view = wait_for(lm, submit(lm, json=JOB).json()["job_id"])
    assert view["status"] == "succeeded", view
    result = view["result"]
    assert "duration" in result["lm"]["fields"]
    assert 1 <= result["duration"] <= 30 and result["lm"]["codes"] == round(result["duration"] * 5)


def test_cover_skips_the_lm_and_upstream_sees_the_lm(lm, dirs):
    from tests.conftest import wav_bytes
    view = wait_for(lm, submit(lm, data={"task_type": "cover", "thinking": "true", "batch_size": "1",
                                         "inference_steps": "2", "audio_format": "wav"},
                               files={"src_audio": ("a.wav", wav_bytes(1.0, 48000, 2), "audio/wav")}).json()["job_id"])
    assert view["status"] == "succeeded" and "lm" not in view["result"], view
    health = lm.get("/health").json()["data"]
    assert health["llm_initialized"] is True and health["loaded_lm_model"] == "acestep-5Hz-lm-tiny"
    inventory = lm.get("/v1/model_inventory").json()["data"]
    assert inventory["lm_models"] == ["acestep-5Hz-lm-tiny"] and inventory["llm_initialized"] is True
    task = lm.post("/release_task", json={**JOB, "duration": 1}).json()["data"]["task_id"]
    wait_for(lm, task)
    item = lm.post("/query_result", json={"task_id_list": [task]}).json()["data"][0]
    assert item["status"] == 1 and '"lm_model": "acestep-5Hz-lm-tiny"' in item["result"]


def test_cancel_stops_the_lm(lm):
    job_id = submit(lm, json={**JOB, "audio_duration": 60}).json()["job_id"]  # 300 codes, with CFG
    deadline = time.time() + 60
    while lm.get(f"/v1/jobs/{job_id}").json()["progress"]["stage"] != "lm":
        assert time.time() < deadline
        time.sleep(0.05)
    assert lm.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"
    deadline = time.time() + 10
    while lm.get("/v1/stats").json()["stages"]["lm"]["in_flight"]:
        assert time.time() < deadline, "the LM still writes for a canceled job"
        time.sleep(0.1)


@pytest.mark.parametrize("field,value", [("thinking", True), ("sample_mode", True), ("sample_query", "a love song"),
                                         ("use_format", True)])
def test_a_server_without_an_lm_refuses_what_needs_one(client, field, value):
    response = submit(client, json={field: value})
    assert response.status_code == 400
    assert response.json()["detail"] == (f"{field}: needs the 5 Hz language model, which this server does not run "
                                         "(its config has no `lm`)")
    assert submit(client, json={"use_cot_caption": True, "use_cot_language": True, "audio_duration": 1,
                                "batch_size": 1, "inference_steps": 1}).status_code == 200  # defaults are fine


def test_format_input_and_create_sample_answer_upstreams_shapes(lm):
    formatted = lm.post("/format_input", json={"prompt": "rock song", "lyrics": "[verse]\nla la",
                                               "param_obj": '{"bpm": 120, "duration": 30}'}).json()
    assert formatted["code"] == 200, formatted
    data = formatted["data"]
    assert set(data) == {"caption", "lyrics", "bpm", "key_scale", "time_signature", "duration", "vocal_language"}
    assert (data["bpm"], data["duration"]) == (120, 30)  # given, so kept
    assert data["key_scale"] and data["time_signature"]  # the LM's
    sample = lm.post("/v1/create_sample", data={"query": "a soft love song", "instrumental": "false"}).json()
    assert sample["code"] == 200, sample
    assert set(sample["data"]) == {"caption", "lyrics", "bpm", "keyscale", "duration", "timesignature",
                                   "vocal_language"}
    assert sample["data"]["caption"] and 30 <= sample["data"]["bpm"] <= 300
    bad = lm.post("/format_input", json={"param_obj": "{not json"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("param_obj: must be a JSON object")
    assert lm.post("/v1/create_sample", json={"temperature": 9}).status_code == 422


def test_random_samples_need_no_lm_and_the_lm_routes_do(client):
    simple = client.post("/create_random_sample", json={}).json()["data"]
    assert set(simple) == {"description", "instrumental", "vocal_language"}
    custom = client.post("/create_random_sample", json={"sample_type": "custom_mode"}).json()["data"]
    assert {"caption", "lyrics", "bpm", "duration", "keyscale", "timesignature"} <= set(custom)
    assert client.post("/create_random_sample", json={"sample_type": "x"}).status_code == 400
    for path in ("/format_input", "/v1/create_sample"):
        response = client.post(path, json={"prompt": "x", "query": "y"})
        assert response.status_code == 400 and response.json()["code"] == 400
        assert response.json()["error"] == (f"{path} needs the 5 Hz language model, which this server does not run "
                                             "(its config has no `lm`)")
