"""All six task types over real HTTP: a base model (the `tiny-base` preset, CFG with APG) runs each of them; a turbo
one (`tiny`) refuses the track tasks at submit, naming itself and the tasks it serves; source audio and audio codes
are checked at submit. The base app serves the turbo model too (`models:`), and `model` picks one per request."""

from __future__ import annotations

import io

import httpx
import pytest
import soundfile as sf

from tests.conftest import deployed, wav_bytes
from tests.deployments.conftest import submit, wait_for

SIX = ["text2music", "cover", "repaint", "lego", "extract", "complete"]
SOURCE = wav_bytes(1.0, 48000, 2)
# Per task: its own fields, under upstream's spellings too (trackName, trackClasses as comma-separated text).
FIELDS = {"text2music": {"audio_duration": "1"}, "cover": {"audio_cover_strength": "0.5"},
          "repaint": {"repainting_start": "0.2"},
          "lego": {"track_name": "drums", "repainting_start": "0.2", "repainting_end": "0.6"},
          "extract": {"trackName": "vocals"}, "complete": {"trackClasses": "drums, bass"}}
CODES = [1, 500, 63999, 42, 7]  # 5 codes of 5 latent frames each: 1 s


@pytest.fixture(scope="module")
def base(serve_http, dirs):
    """The tiny-base app beside the tiny one (`client`): the same weights, a base DiT, all six tasks; and `tiny` as a
    further model."""
    args = {"name": "tasks-test", "model": {"preset": "tiny-base"}, "models": [{"preset": "tiny"}],
            "queue": {"max_queued_jobs": 20, "max_running_jobs": 8, "default_duration_s": 1.0, "max_duration_s": 30},
            "files": {"output_dir": str(dirs["results"]), "upload_dir": str(dirs["uploads"]),
                      "allowed_input_dirs": [str(dirs["inputs"])], "max_upload_bytes": 2 * 1024 * 1024,
                      "journal_path": str(dirs["journal"])}}
    with deployed(args, "tasks-test", "/tasks", serve_http) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def test_every_task_runs_on_a_base_model(base):
    jobs = {}
    for task in SIX:  # all submitted before any is awaited: they share the stages' batches
        files = {} if task == "text2music" else {"src_audio": ("song.wav", SOURCE, "audio/wav")}
        response = submit(base, data={"task_type": task, "caption": f"{task} test", "batch_size": "1",
                                      "inference_steps": "2", "guidance_scale": "5", "audio_format": "wav",
                                      **FIELDS[task]}, files=files)
        assert response.status_code == 200, (task, response.text)
        jobs[task] = response.json()["job_id"]
    for task, job_id in jobs.items():
        view = wait_for(base, job_id)
        assert view["status"] == "succeeded", (task, view)
        result = view["result"]
        assert f"Task: {task}," in result["generation_info"]
        assert result["duration"] == 1.0 and result["dit_model"] == "acestep-v15-tiny-base"
        info = sf.info(io.BytesIO(base.get(result["first_audio_path"]).content))
        assert (info.samplerate, info.channels, info.frames) == (48000, 2, 48000)


def test_models_and_inventory_list_each_model_with_its_tasks(base, client):
    listed = [("acestep-v15-tiny-base", True, SIX), ("acestep-v15-tiny", False, ["text2music", "cover", "repaint"])]
    inventory = base.get("/v1/model_inventory").json()["data"]
    assert [(m["name"], m["is_default"], m["supported_task_types"]) for m in inventory["models"]] == listed
    assert inventory["default_model"] == "acestep-v15-tiny-base"
    models = base.get("/v1/models").json()
    assert [(m["name"], m["is_default"], m["supported_task_types"]) for m in models["models"]] == listed
    assert models["data"]["models"] == models["models"] and models["default_model"] == "acestep-v15-tiny-base"
    [model] = client.get("/v1/model_inventory").json()["data"]["models"]
    assert (model["name"], model["supported_task_types"]) == ("acestep-v15-tiny", ["text2music", "cover", "repaint"])


def test_model_picks_the_dit_a_job_runs_on(base):
    """Each model has its own ConditionEncoder and DiT deployments; `model` (or upstream's `dit_model`) routes the
    job to them, and the model's variant decides its tasks."""
    common = {"caption": "which model", "batch_size": 1, "inference_steps": 2, "audio_duration": 1,
              "audio_format": "wav"}
    jobs = {"acestep-v15-tiny": submit(base, json={**common, "model": "acestep-v15-tiny"}).json()["job_id"],
            "acestep-v15-tiny-base": submit(base, json=common).json()["job_id"]}
    v2 = base.post("/release_task", json={**common, "dit_model": "acestep-v15-tiny"}).json()
    for model, job_id in [*jobs.items(), ("acestep-v15-tiny", v2["data"]["task_id"])]:
        view = wait_for(base, job_id)
        assert view["status"] == "succeeded", view
        assert view["result"]["dit_model"] == model
    stats = base.get("/v1/stats").json()
    assert {"dit", "dit:acestep-v15-tiny", "condition", "condition:acestep-v15-tiny", "codec"} <= set(stats["stages"])
    assert stats["replicas"]["DiT-acestep-v15-tiny"] == stats["replicas"]["ConditionEncoder-acestep-v15-tiny"] == 1
    response = submit(base, data={"model": "acestep-v15-tiny", "task_type": "lego", "track_name": "drums"},
                      files={"src_audio": ("song.wav", SOURCE, "audio/wav")})
    assert response.status_code == 400 and response.json()["detail"].startswith(
        "task_type: model 'acestep-v15-tiny' (turbo variant) does not serve lego")


def test_an_unknown_model_is_400_on_both_apis(base):
    detail = ("model: unknown model 'acestep-v15-xl'; available: ['acestep-v15-tiny-base', 'acestep-v15-tiny']")
    response = submit(base, json={"model": "acestep-v15-xl"})
    assert response.status_code == 400 and response.json() == {"detail": detail}
    v2 = base.post("/release_task", json={"dit_model": "acestep-v15-xl"})
    assert v2.status_code == 400 and (v2.json()["code"], v2.json()["error"]) == (400, detail)


@pytest.mark.parametrize("task", ["lego", "extract", "complete"])
def test_a_turbo_model_refuses_the_track_tasks_naming_itself_and_its_tasks(client, task):
    response = submit(client, data={"task_type": task, "track_name": "drums"},
                      files={"src_audio": ("song.wav", SOURCE, "audio/wav")})
    expected = (f"task_type: model 'acestep-v15-tiny' (turbo variant) does not serve {task}; it serves text2music, "
                "cover, repaint")
    assert response.status_code == 400 and response.json() == {"detail": expected}
    v2 = client.post("/release_task", json={"task_type": task, "trackName": "drums"})
    assert v2.status_code == 400 and v2.json()["error"] == expected


@pytest.mark.parametrize("task", ["lego", "extract", "complete"])
def test_a_track_task_without_source_audio_is_400(base, task):
    response = submit(base, json={"task_type": task, "track_name": "vocals", "track_classes": ["drums"]})
    assert response.status_code == 400
    assert response.json() == {"detail": f"task_type {task} needs src_audio (upload) or src_audio_path"}


def test_audio_codes_make_the_source_and_set_the_length(base):
    """As tokens and as integers (camelCase too), the same codes: the same audio, 1 s long from 5 codes."""
    common = {"caption": "codes", "batch_size": 1, "inference_steps": 2, "audio_format": "wav",
              "use_random_seed": False, "seed": 3}
    tokens = " ".join(f"<|audio_code_{n}|>" for n in CODES)
    ids = [submit(base, json={**common, "audio_code_string": tokens}).json()["job_id"],
           submit(base, json={**common, "audioCodeString": CODES}).json()["job_id"]]
    audio = []
    for job_id in ids:
        view = wait_for(base, job_id)
        assert view["status"] == "succeeded", view
        assert view["result"]["duration"] == 1.0
        audio.append(sf.read(io.BytesIO(base.get(view["result"]["first_audio_path"]).content), dtype="int16")[0])
    assert audio[0].shape == audio[1].shape == (48000, 2)
    assert abs(audio[0].astype(int) - audio[1].astype(int)).max() <= 1  # to a PCM-16 step (batch-mates or not)


@pytest.mark.parametrize("codes,status,detail", [
    ("not codes", 422, "audio_code_string: must be <|audio_code_N|> tokens only, or a list of integers"),
    ([1, -2], 422, "audio_code_string.1: Input should be greater than or equal to 0"),
    ("<|audio_code_1|><|audio_code_64000|>", 422,
     "audio_code_string: code 64000 is outside model 'acestep-v15-tiny-base''s codebook (0 to 63999)"),
    ([7] * 151, 422, "audio_code_string: 151 codes make 30.2 s of audio, more than this server's 30 s"),
])
def test_invalid_audio_codes_are_4xx(base, codes, status, detail):
    response = submit(base, json={"audio_code_string": codes})
    assert response.status_code == status, response.text
    assert response.json()["detail"].startswith(detail), response.text
