"""LoRA per job over real HTTP: a random adapter for the tiny DiT, written to the app's `lora_dir` by the test, changes
the audio; a job with it gives the same audio alone and in the same DiT round as a job without one (different
adapters never share a forward pass); bad names are 4xx; upstream's `/v1/lora/*` answer for per-job adapters."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from models.lora import write_random_adapter
from tests.deployments.conftest import submit, wait_for

JOB = {"caption": "lora", "batch_size": 1, "inference_steps": 3, "audio_duration": 1, "audio_format": "wav",
       "use_random_seed": False, "seed": 5}


@pytest.fixture(scope="module")
def adapter(dirs):
    write_random_adapter("tiny", dirs["lora"] / "grit", seed=1)
    return "grit"


def _audio(client, job_id: str) -> np.ndarray:
    view = wait_for(client, job_id)
    assert view["status"] == "succeeded", view
    return sf.read(io.BytesIO(client.get(view["result"]["first_audio_path"]).content), dtype="int16")[0].astype(int)


def test_an_adapter_changes_the_audio_the_same_alone_and_beside_a_job_without_one(client, adapter):
    together = [submit(client, json=JOB).json()["job_id"],
                submit(client, json={**JOB, "lora": adapter, "lora_scale": 0.8}).json()["job_id"]]
    plain, with_lora = (_audio(client, job_id) for job_id in together)
    view = wait_for(client, together[1])
    assert view["result"]["lora"] == {"name": "grit", "scale": 0.8}
    alone = _audio(client, submit(client, json={**JOB, "lora": adapter, "lora_scale": 0.8}).json()["job_id"])
    assert abs(with_lora - alone).max() <= 1  # to a PCM-16 step
    assert abs(with_lora - plain).mean() > 10  # the adapter changes the audio, far beyond rounding (<= 1)
    v2 = client.post("/release_task", json={**JOB, "lora_name": adapter, "loraScale": 0.8}).json()["data"]
    assert abs(_audio(client, v2["task_id"]) - alone).max() <= 1  # upstream's names reach the same adapter


@pytest.mark.parametrize("payload,status,detail", [
    ({"lora": "nope"}, 400, "lora: unknown lora 'nope'; available: grit (model 'acestep-v15-tiny')"),
    ({"lora": "../results"}, 400, "lora: lora '../results' is not an adapter name"),
    ({"lora": "grit", "lora_scale": 3}, 422, "lora_scale: Input should be less than or equal to 2"),
])
def test_bad_adapters_are_4xx(client, adapter, payload, status, detail):
    response = submit(client, json={**JOB, **payload})
    assert response.status_code == status, response.text
    assert response.json()["detail"].startswith(detail), response.text


def test_upstream_lora_routes_answer_for_per_job_adapters(client, adapter, dirs):
    status = client.get("/v1/lora/status").json()
    assert status["code"] == 200 and status["data"]["adapters"] == ["grit"] and status["data"]["per_request"]
    assert status["data"]["adapters_by_model"] == {"acestep-v15-tiny": ["grit"]}
    for path in ("grit", str(dirs["lora"] / "grit")):
        loaded = client.post("/v1/lora/load", json={"lora_path": path})
        assert loaded.status_code == 200 and loaded.json()["data"]["adapter_name"] == "grit", loaded.text
    outside = client.post("/v1/lora/load", json={"lora_path": str(dirs["results"])})
    assert outside.status_code == 400 and outside.json()["code"] == 400
    assert "is not an adapter directory of model 'acestep-v15-tiny''s lora_dir" in outside.json()["error"]
    assert client.post("/v1/lora/unload").status_code == 200
    assert client.post("/v1/lora/toggle", json={"use_lora": False}).status_code == 200
    for path, body in (("/v1/lora/toggle", {"use_lora": True}), ("/v1/lora/scale", {"scale": 0.5})):
        response = client.post(path, json=body)
        assert response.status_code == 400 and "per job" in response.json()["error"], response.text
