"""Results written to an S3-compatible object store by the codec are served by the ingress; uploads go through the
same kind of store, so the ingress that stores one, the codec that reads it and the registry that deletes it may
sit on three nodes with no shared filesystem."""

from __future__ import annotations

import io
import time

import fsspec
import httpx
import soundfile as sf

from tests.conftest import deployed, wav_bytes
from tests.deployments.conftest import run_job, wait_for


def test_results_on_object_storage(serve_http, s3_server, dirs):
    args = {"name": "s3-test", "queue": {"default_duration_s": 1.0, "max_running_jobs": 1},
            "files": {"output_dir": "s3://acestep-results/jobs", "storage_options": s3_server,
                      "upload_dir": "s3://acestep-results/uploads", "journal_path": str(dirs["journal"])}}
    with deployed(args, "s3-test", "/s3", serve_http) as url, httpx.Client(base_url=url, timeout=30) as client:
        view = run_job(client, {"caption": "to the cloud", "batch_size": 1, "audio_format": "flac"})
        key = view["result"]["first_audio_path"].split("path=")[1].replace("%2F", "/")
        response = client.get(view["result"]["first_audio_path"])
        assert response.status_code == 200 and response.headers["content-type"] == "audio/flac"
        assert sf.info(io.BytesIO(response.content)).samplerate == 48000
        assert client.get("/v1/audio", params={"path": key.replace("/0.", "/7.")}).status_code == 404
        s3 = fsspec.filesystem("s3", **s3_server)
        assert s3.cat_file(f"acestep-results/jobs/{key}") == response.content

        local_uploads = set(dirs["uploads"].iterdir())
        blocker = client.post("/v1/music/generate", json={"caption": "hold the only slot", "batch_size": 1,
                                                          "audio_duration": 60, "inference_steps": 200}).json()
        response = client.post("/v1/music/generate", data={"task_type": "repaint", "batch_size": "1",
                                                           "repainting_start": "0.2", "repainting_end": "0.6"},
                               files={"src_audio": ("song.wav", wav_bytes(1.0), "audio/wav")})
        assert response.status_code == 200, response.text
        job = response.json()["job_id"]
        assert response.json()["status"] == "queued"
        assert s3.exists(f"acestep-results/uploads/{job}/src_audio")  # stored by the ingress, in the object store
        client.post(f"/v1/jobs/{blocker['job_id']}/cancel")
        view = wait_for(client, job)
        assert view["status"] == "succeeded", view
        assert abs(view["result"]["duration"] - 1.0) < 0.05  # the source's length, read by the codec from S3
        assert set(dirs["uploads"].iterdir()) == local_uploads  # nothing on a local disk
        s3.invalidate_cache()
        deadline = time.time() + 10  # the registry deletes the upload once the job ends, off its event loop
        while s3.exists(f"acestep-results/uploads/{job}/src_audio"):
            assert time.time() < deadline, "the upload outlived its job"
            time.sleep(0.2)
            s3.invalidate_cache()
