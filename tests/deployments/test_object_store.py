"""Results written to an S3-compatible object store by the driver are served by the ingress."""

from __future__ import annotations

import io

import httpx
import soundfile as sf

from tests.conftest import deployed
from tests.deployments.conftest import run_job


def test_results_on_object_storage(serve_http, s3_server, dirs):
    args = {"name": "s3-test", "queue": {"default_duration_s": 1.0},
            "files": {"output_dir": "s3://acestep-results/jobs", "storage_options": s3_server,
                      "upload_dir": str(dirs["uploads"]), "journal_path": str(dirs["journal"])}}
    with deployed(args, "s3-test", "/s3", serve_http) as url, httpx.Client(base_url=url, timeout=30) as client:
        view = run_job(client, {"caption": "to the cloud", "batch_size": 1, "audio_format": "flac"})
        key = view["result"]["first_audio_path"].split("path=")[1].replace("%2F", "/")
        response = client.get(view["result"]["first_audio_path"])
        assert response.status_code == 200 and response.headers["content-type"] == "audio/flac"
        assert sf.info(io.BytesIO(response.content)).samplerate == 48000
        assert client.get("/v1/audio", params={"path": key.replace("/0.", "/7.")}).status_code == 404
    import fsspec

    stored = fsspec.filesystem("s3", **s3_server).cat_file(f"acestep-results/jobs/{key}")
    assert stored == response.content
