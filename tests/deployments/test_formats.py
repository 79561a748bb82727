"""Output formats over real HTTP (tiny preset): each file listed with its extension, served with its Content-Type,
and decoding to the rate, channels and length asked for; mp3_bitrate reaches the encoder; bad values are refused."""

from __future__ import annotations

import io
from urllib.parse import unquote

import pytest
import soundfile as sf

from models.audio_io import MEDIA_TYPES
from tests.conftest import EXTRA_SAMPLES, decode_audio, mp3_frame_bitrates
from tests.deployments.conftest import submit, wait_for

SAMPLES = 48000  # 1 s at the tiny preset's 48 kHz
JOBS = {  # name: (request fields, extension, Content-Type)
    "opus": ({"audio_format": "opus"}, "opus", "audio/ogg; codecs=opus"),
    "aac": ({"audio_format": "aac"}, "aac", "audio/aac"),
    "wav32": ({"audio_format": "wav32"}, "wav", "audio/wav"),
    "mp3 at 320 kbps": ({"audio_format": "mp3", "mp3_bitrate": 320}, "mp3", "audio/mpeg"),
}


@pytest.fixture(scope="module")
def finished(client) -> dict[str, dict]:
    """The jobs, submitted together (2 steps, 1 s, one output each): their views once finished."""
    ids = {}
    for name, (fields, _, _) in JOBS.items():
        response = submit(client, json={"caption": f"format {name}", "audio_duration": SAMPLES / 48000,
                                        "inference_steps": 2, "batch_size": 1, **fields})
        assert response.status_code == 200, response.text
        ids[name] = response.json()["job_id"]
    return {name: wait_for(client, job_id) for name, job_id in ids.items()}


@pytest.mark.parametrize("name", JOBS)
def test_result_is_served_with_its_content_type_and_decodes(client, finished, name):
    fields, extension, content_type = JOBS[name]
    fmt = fields["audio_format"]
    view = finished[name]
    assert view["status"] == "succeeded", view
    url = view["result"]["first_audio_path"]
    assert view["result"]["audio_paths"] == [url] and unquote(url).endswith(f"/0.{extension}")
    response = client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == content_type
    audio, rate = decode_audio(response.content, fmt)
    least, most = EXTRA_SAMPLES[fmt]
    assert (rate, audio.shape[0]) == (48000, 2)
    assert SAMPLES + least <= audio.shape[1] <= SAMPLES + most, audio.shape
    if fmt == "wav32":
        assert sf.info(io.BytesIO(response.content)).subtype == "FLOAT"
    if fmt == "mp3":
        rates, first = mp3_frame_bitrates(response.content)
        assert set(rates) == {320} and b"Info" in first  # constant, as asked


def test_openapi_lists_every_content_type(client):
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]["/v1/audio"]["get"]["responses"]["200"]["content"]) == set(MEDIA_TYPES.values()) == {
        "audio/mpeg", "audio/wav", "audio/flac", "audio/ogg; codecs=opus", "audio/aac"}
    fields = spec["paths"]["/v1/music/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert fields["properties"]["mp3_bitrate"]["anyOf"][0]["enum"] == [64, 80, 96, 112, 128, 160, 192, 224, 256, 320]


@pytest.mark.parametrize("fields,status,detail", [
    ({"audio_format": "m4a"}, 400,
     """audio_format: Input should be 'mp3', 'wav', 'flac', 'opus', 'aac' or 'wav32' (got "m4a")"""),
    ({"audio_format": "mp3", "mp3_bitrate": 100}, 422,
     "mp3_bitrate: Input should be 64, 80, 96, 112, 128, 160, 192, 224, 256 or 320 (got 100)"),
])
def test_unknown_format_or_bitrate_is_refused_naming_the_choices(client, fields, status, detail):
    for body in ({"json": fields}, {"data": {k: str(v) for k, v in fields.items()}}):  # JSON, then form fields
        response = submit(client, **body)
        assert response.status_code == status, response.text
        assert response.json()["detail"] == detail
