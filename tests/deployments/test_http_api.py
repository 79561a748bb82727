"""The HTTP contract, over real HTTP against the real Serve app (tiny preset)."""

from __future__ import annotations

import io
import json
from urllib.parse import unquote

import pytest
import soundfile as sf

from tests.conftest import wav_bytes
from tests.deployments.conftest import run_job, submit, wait_for

JOB_KEYS = {"job_id", "status", "created_at", "started_at", "finished_at", "queue_position", "eta_seconds",
            "avg_job_seconds", "result", "error", "attempts", "progress"}
RESULT_KEYS = {"first_audio_path", "second_audio_path", "audio_paths", "generation_info", "status_message",
               "seed_value", "metas", "bpm", "duration", "keyscale", "timesignature", "genres", "dit_model"}


def download(client, url: str) -> tuple[bytes, str]:
    response = client.get(url)
    assert response.status_code == 200, response.text
    return response.content, response.headers["content-type"]


def test_json_job_end_to_end(client):
    response = submit(client, json={"caption": "upbeat pop", "lyrics": "[verse]\nhello", "audio_duration": 1.5,
                                    "inference_steps": 4})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"job_id", "status", "queue_position"}
    assert body["status"] == "queued" and body["queue_position"] >= 1

    history: list[dict] = []
    view = wait_for(client, body["job_id"], history=history)
    order = {"queued": 0, "running": 1, "succeeded": 2, "failed": 2}
    assert all(set(v) == JOB_KEYS for v in history)
    ranks = [order[v["status"]] for v in history]
    assert ranks == sorted(ranks), "status moved backwards"
    assert view["status"] == "succeeded" and view["error"] is None and view["queue_position"] == 0
    assert view["started_at"] >= view["created_at"] and view["finished_at"] >= view["started_at"]

    result = view["result"]
    assert RESULT_KEYS <= set(result)
    assert len(result["audio_paths"]) == 2  # batch_size null -> 2
    assert result["first_audio_path"] == result["audio_paths"][0]
    assert result["second_audio_path"] == result["audio_paths"][1]
    assert result["dit_model"] == "acestep-v15-tiny"
    assert result["metas"]["caption"] == "upbeat pop"
    for url in result["audio_paths"]:
        assert url.startswith("/v1/audio?path=")
        data, content_type = download(client, url)
        assert content_type == "audio/mpeg"
        info = sf.info(io.BytesIO(data))
        assert (info.samplerate, info.channels) == (48000, 2)
        assert abs(info.duration - 1.5) < 0.05


@pytest.mark.parametrize("fmt,mime,subtype", [("wav", "audio/wav", "PCM_16"), ("flac", "audio/flac", "PCM_16")])
def test_lossless_formats_have_exact_length(client, fmt, mime, subtype):
    view = run_job(client, {"caption": "x", "audio_duration": 2.0, "audio_format": fmt.upper(), "batch_size": 1,
                            "inference_steps": 2})
    assert len(view["result"]["audio_paths"]) == 1 and view["result"]["second_audio_path"] is None
    data, content_type = download(client, view["result"]["first_audio_path"])
    assert content_type == mime
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (48000, 2, 96000, subtype)


def test_fixed_seed_is_honoured_and_reproducible(client):
    payload = {"caption": "seeded", "audio_duration": 1.0, "use_random_seed": False, "seed": 1234,
               "batch_size": 3, "audio_format": "wav", "inference_steps": 3}
    first, second = run_job(client, payload), run_job(client, payload)
    assert first["result"]["seed_value"] == "1234,1235,1236"
    files_a = [download(client, u)[0] for u in first["result"]["audio_paths"]]
    files_b = [download(client, u)[0] for u in second["result"]["audio_paths"]]
    assert files_a == files_b, "same request and seeds must give identical audio"
    assert len(set(files_a)) == 3, "different seeds must give different audio"
    other = run_job(client, {**payload, "seed": 99, "batch_size": 1})
    assert other["result"]["seed_value"] == "99"
    assert download(client, other["result"]["first_audio_path"])[0] != files_a[0]


def test_a_job_sounds_the_same_alone_and_batched_with_others(client):
    """Cross-job batching over the real app: the same seeded job, alone and then submitted together with jobs of
    other durations, prompt and lyric lengths, gives the same audio (to a PCM-16 step). The DiT's record of the most
    jobs it shared a forward pass with proves the batched run was batched."""
    job = {"caption": "batched", "audio_duration": 1.0, "use_random_seed": False, "seed": 7, "batch_size": 1,
           "audio_format": "wav", "inference_steps": 30}
    others = [{**job, "caption": "a much longer caption for another job", "lyrics": "[verse]\nla la la",
               "audio_duration": 1.2, "seed": 8},
              {**job, "caption": "x", "audio_duration": 1.1, "seed": 9, "batch_size": 2}]
    alone = run_job(client, job)
    assert alone["result"]["batching"]["dit_max_jobs_per_pass"] == 1
    for _ in range(3):  # submitted together, they meet in the DiT; on a loaded machine, try again
        ids = [submit(client, json=payload).json()["job_id"] for payload in (others[0], job, others[1])]
        batched = wait_for(client, ids[1])
        assert batched["status"] == "succeeded" and all(wait_for(client, i)["status"] == "succeeded" for i in ids)
        if batched["result"]["batching"]["dit_max_jobs_per_pass"] >= 2:
            break
    assert batched["result"]["batching"]["dit_max_jobs_per_pass"] >= 2, "the job never shared a forward pass"
    a, b = (sf.read(io.BytesIO(download(client, view["result"]["first_audio_path"])[0]), dtype="int16")[0]
            for view in (alone, batched))
    assert a.shape == b.shape == (48000, 2)
    assert abs(a.astype(int) - b.astype(int)).max() <= 1


def test_random_seeds_are_reported(client):
    view = run_job(client, {"caption": "r", "audio_duration": 1.0, "batch_size": 2, "inference_steps": 2})
    seeds = view["result"]["seed_value"].split(",")
    assert len(seeds) == 2 and all(s.isdigit() for s in seeds)


@pytest.mark.parametrize("headers,body", [
    ({"Content-Type": "application/JSON; charset=UTF-8"}, json.dumps({"caption": "a", "audio_duration": 1})),
    ({"Content-Type": "application/vnd.acestep+json"}, json.dumps({"caption": "a", "audio_duration": 1})),
    ({}, json.dumps({"caption": "a", "audio_duration": 1})),  # header-less JSON is sniffed
    ({}, "caption=a&audio_duration=1"),  # header-less form is sniffed
    ({"Content-Type": "application/x-www-form-urlencoded"}, "caption=a&audio_duration=1&inference_steps=2"),
])
def test_accepted_content_types(client, headers, body):
    response = client.post("/v1/music/generate", content=body.encode(), headers=headers)
    assert response.status_code == 200, response.text
    view = wait_for(client, response.json()["job_id"])
    assert view["status"] == "succeeded" and view["result"]["duration"] == 1.0


def test_multipart_fields_without_files(client):
    response = submit(client, data={"caption": "form", "audio_duration": "1", "batch_size": "1"},
                      files={"unused": ("x.txt", b"ignored", "text/plain")})
    assert response.status_code == 200, response.text
    view = wait_for(client, response.json()["job_id"])
    assert view["status"] == "succeeded" and len(view["result"]["audio_paths"]) == 1


@pytest.mark.parametrize("headers,body,shown", [
    ({"Content-Type": "text/plain"}, b"hello", "text/plain"),
    ({}, b"", "(missing)"),
])
def test_unsupported_content_type_is_415(client, headers, body, shown):
    response = client.post("/v1/music/generate", content=body, headers=headers)
    assert response.status_code == 415
    assert response.json() == {"detail": f"Unsupported Content-Type: {shown}; use application/json, "
                                         "application/x-www-form-urlencoded, or multipart/form-data"}


def test_aliases_nested_metas_and_coercion(client):
    view = run_job(client, {"prompt": "aliased", "inferenceSteps": "3", "audioDuration": "1.5", "batchSize": 1,
                            "metas": json.dumps({"bpm": "100", "keyscale": "D minor", "timeSignature": "3"}),
                            "some_unknown_key": {"deep": [1, 2]}})
    result = view["result"]
    assert (result["bpm"], result["keyscale"], result["timesignature"]) == (100, "D minor", "3")
    assert result["duration"] == 1.5 and result["metas"]["caption"] == "aliased"
    assert result["generation_info"].startswith("Steps: 3,")


def test_unknown_job_is_404(client):
    response = client.get("/v1/jobs/00000000-0000-0000-0000-000000000000")
    assert response.status_code == 404 and response.json() == {"detail": "Job not found"}


@pytest.mark.parametrize("path,status", [
    ("/etc/passwd", 403), ("../../etc/passwd", 403), ("%2Fetc%2Fhostname", 403),
    ("00000000-0000-0000-0000-000000000000/0.mp3", 404), ("00000000-0000-0000-0000-000000000000/../../x.mp3", 403),
])
def test_audio_serves_only_results(client, path, status):
    response = client.get("/v1/audio", params={"path": unquote(path)})
    assert response.status_code == status
    assert isinstance(response.json()["detail"], str)


def test_service_endpoints(client):
    envelope = {"data", "code", "error", "timestamp", "extra"}  # upstream v2's, beside (test_upstream_api.py)
    health, models = client.get("/health").json(), client.get("/v1/models").json()
    assert {k: v for k, v in health.items() if k not in envelope} == {"status": "ok", "service": "ACE-Step API",
                                                                      "version": "1.0"}
    assert {k: v for k, v in models.items() if k not in envelope} == {
        "models": [{"name": "acestep-v15-tiny", "is_default": True,
                    "supported_task_types": ["text2music", "cover", "repaint"]}],
        "default_model": "acestep-v15-tiny"}
    spec = client.get("/openapi.json").json()
    assert {"/v1/music/generate", "/v1/jobs/{job_id}", "/v1/audio", "/health", "/v1/models"} <= set(spec["paths"])
    body_schema = spec["paths"]["/v1/music/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema["properties"]["inference_steps"]["default"] == 8
    assert client.get("/docs").status_code == 200
    stats = client.get("/v1/stats").json()
    assert {"jobs", "queue_size", "queue_maxsize", "avg_job_seconds"} <= set(stats)


def test_repaint_with_uploaded_source(client):
    response = submit(client, data={"caption": "repaint me", "task_type": "repaint", "repainting_start": "0.2",
                                    "repainting_end": "0.8", "batch_size": "1", "audio_format": "wav"},
                      files={"src_audio": ("song.wav", wav_bytes(1.2, 44100, 1), "audio/wav")})
    assert response.status_code == 200, response.text
    view = wait_for(client, response.json()["job_id"])
    assert view["status"] == "succeeded", view
    data, _ = download(client, view["result"]["first_audio_path"])
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.channels) == (48000, 2)
    assert info.frames == 30 * 1920  # the source's length (1.2 s = 30 latent frames) is the default duration


def test_repaint_with_server_path(client, dirs):
    source = dirs["inputs"] / "song.flac"
    source.write_bytes(wav_bytes(1.0, 48000, 2, fmt="FLAC"))
    view = run_job(client, {"caption": "p", "task_type": "repaint", "src_audio_path": str(source),
                            "repainting_start": 0.1, "batch_size": 1})
    assert view["result"]["duration"] == 1.0
    assert source.exists(), "a server-side input is not the service's to delete"


def test_cover_with_source_and_strength(client):
    response = submit(client, data={"caption": "cover", "task_type": "cover", "audio_cover_strength": "0.5",
                                    "batch_size": "1", "inference_steps": "2"},
                      files={"src_audio": ("s.wav", wav_bytes(1.0, 48000, 2), "audio/wav")})
    assert response.status_code == 200, response.text
    assert wait_for(client, response.json()["job_id"])["status"] == "succeeded"


@pytest.mark.slow
def test_cover_with_reference_audio(client):
    """Timbre from a reference clip: the VAE encodes a 30 s excerpt, which the tiny preset does in ~30 s on CPU."""
    response = submit(client, data={"caption": "style", "task_type": "cover", "batch_size": "1",
                                    "audio_duration": "1", "inference_steps": "2"},
                      files={"reference_audio": ("r.wav", wav_bytes(0.5, 22050, 1), "audio/wav")})
    assert response.status_code == 200, response.text
    view = wait_for(client, response.json()["job_id"], timeout=300)
    assert view["status"] == "succeeded", view


def test_uploads_are_removed_when_the_job_ends(client, dirs):
    response = submit(client, data={"task_type": "repaint", "batch_size": "1", "inference_steps": "1"},
                      files={"src_audio": ("s.wav", wav_bytes(0.5), "audio/wav")})
    job_id = response.json()["job_id"]
    assert wait_for(client, job_id)["status"] == "succeeded"
    assert not (dirs["uploads"] / job_id).exists()


@pytest.mark.parametrize("payload,status,field", [
    ({"inference_steps": 0}, 422, "inference_steps"),
    ({"inference_steps": 500}, 422, "inference_steps"),
    ({"inference_steps": "abc"}, 422, "inference_steps"),
    ({"batch_size": 9}, 422, "batch_size"),
    ({"audio_duration": 0}, 422, "audio_duration"),
    ({"audio_duration": -5}, 422, "audio_duration"),
    ({"audio_duration": 1e9}, 422, "audio_duration"),
    ({"guidance_scale": 100}, 422, "guidance_scale"),
    ({"bpm": 10}, 422, "bpm"),
    ({"bpm": "fast"}, 422, "bpm"),
    ({"bpm": 120.5}, 422, "bpm"),
    ({"use_random_seed": "nope"}, 422, "use_random_seed"),
    ({"caption": "x" * 5000}, 422, "caption"),
    ({"audio_format": "ogg"}, 400, "audio_format"),
    ({"task_type": "karaoke"}, 400, "task_type"),  # unknown (lego on a turbo model: test_tasks.py)
    ({"model": "acestep-v15-unknown"}, 400, "model"),
    ({"repainting_start": 5, "repainting_end": 2}, 422, "repainting_end"),
])
def test_bad_values_are_4xx_naming_the_field(client, payload, status, field):
    response = submit(client, json=payload)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and field in detail


@pytest.mark.parametrize("body", [b"{bad json", b"", b"[1, 2]", b'{"a": ' * 5000, b'{"audio_duration": NaN}',
                                  b'{"guidance_scale": Infinity}', b"\xff\xfe\x00"])
def test_malformed_json_is_4xx(client, body):
    response = client.post("/v1/music/generate", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert isinstance(response.json()["detail"], str)


def test_oversized_bodies_are_413(client):
    big = json.dumps({"caption": "x", "pad": "y" * (2 * 1024 * 1024)})
    assert submit(client, content=big, headers={"Content-Type": "application/json"}).status_code == 413
    upload = wav_bytes(30.0, 48000, 2)  # ~5.8 MB > the 2 MB test limit
    response = submit(client, data={"task_type": "repaint"}, files={"src_audio": ("big.wav", upload, "audio/wav")})
    assert response.status_code == 413 and "bytes" in response.json()["detail"]


@pytest.mark.parametrize("content", [b"this is not audio at all", wav_bytes(1.0)[:60]])
def test_non_audio_upload_is_400(client, content):
    response = submit(client, data={"task_type": "repaint"}, files={"src_audio": ("x.wav", content, "audio/wav")})
    assert response.status_code == 400 and response.json()["detail"].startswith("src_audio:")


def test_paths_outside_allowed_dirs_are_403(client, dirs):
    outside = dirs["outside"] / "secret.wav"
    outside.write_bytes(wav_bytes(0.5))
    link = dirs["inputs"] / "link.wav"
    link.symlink_to(outside)
    for path in (str(outside), "/etc/passwd", str(dirs["inputs"] / ".." / "outside" / "secret.wav"), str(link)):
        response = submit(client, json={"task_type": "repaint", "src_audio_path": path})
        assert response.status_code == 403, (path, response.text)
        assert "outside the allowed input directories" in response.json()["detail"]
    response = submit(client, json={"task_type": "cover", "reference_audio_path": str(dirs["inputs"] / "none.wav")})
    assert response.status_code == 400


def test_tasks_needing_audio_say_so(client):
    response = submit(client, json={"task_type": "repaint"})
    assert response.status_code == 400 and "src_audio" in response.json()["detail"]


def test_readyz_and_replicas(client):
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert set(ready.json()["stages"]) == {"ConditionEncoder", "DiT", "AudioCodec"}
    replicas = client.get("/v1/stats").json()["replicas"]
    assert replicas == {"Ingress": 1, "JobDriver": 1, "ConditionEncoder": 1, "DiT": 1, "AudioCodec": 1}
