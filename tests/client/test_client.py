"""acestep_client over real HTTP against the tiny app: submit, follow, download, errors, cancel, retries, the CLI and
the async twin. One job runs at a time here, so a job behind a longer one is seen queued."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import httpx
import pytest

from acestep_client import (APIConnectionError, AsyncClient, BadRequestError, Client, ConflictError,
                            InvalidRequestError, JobCanceledError, NotFoundError, RetryPolicy, UnknownFieldError,
                            WaitTimeoutError)
from acestep_client.cli import main
from acestep_client.request import GenerateFields
from jobs.schemas import AUDIO_FORMATS, MP3_BITRATES, TASK_TYPES, GenerateRequest
from tests.conftest import decode_audio, deployed, wav_bytes

APP = "client-test"
SHORT = {"audio_duration": 1.0, "inference_steps": 2, "batch_size": 1}  # about a second on the tiny preset
# Runs for a minute unless canceled: the job submitted after it stays queued until the test cancels it.
BLOCKER = {"caption": "blocker", "audio_duration": 60.0, "inference_steps": 200, "batch_size": 1}
FAST_RETRY = RetryPolicy(retries=3, backoff_s=0.01, max_backoff_s=0.05)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(serve_http, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("client")
    args = {"name": APP, "queue": {"max_running_jobs": 1, "default_duration_s": 1.0},
            "files": {"output_dir": str(root / "results"), "upload_dir": str(root / "uploads"), "journal_path": None}}
    with deployed(args, APP, "/client", serve_http) as url:
        yield url


@pytest.fixture
def client(server):
    with Client(server, retry=FAST_RETRY) as c:
        yield c


def statuses(views) -> list[str]:
    """The statuses seen, each once, in order."""
    seen: list[str] = []
    for view in views:
        if not seen or seen[-1] != view.status:
            seen.append(view.status)
    return seen


# -- no server needed ---------------------------------------------------------------------------------------------
def test_the_typed_fields_are_the_servers_fields():
    hints = typing.get_type_hints(GenerateFields)
    assert set(hints) == set(GenerateRequest.model_fields)
    assert typing.get_args(hints["audio_format"]) == AUDIO_FORMATS
    assert typing.get_args(hints["task_type"]) == TASK_TYPES
    assert typing.get_args(typing.get_args(hints["mp3_bitrate"])[0]) == MP3_BITRATES


def test_a_bad_value_raises_before_any_request():
    sent = []
    transport = httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(500))
    with Client("http://nowhere.invalid", transport=transport) as offline:
        with pytest.raises(InvalidRequestError) as error:
            offline.generate(caption="x", inference_steps=500)
        assert error.value.status_code == 422
        assert error.value.detail == "inference_steps: Input should be less than or equal to 200 (got 500)"
        with pytest.raises(InvalidRequestError) as error:
            offline.generate(audio_format="ogg")
        assert error.value.status_code == 400 and error.value.detail.startswith("audio_format: Input should be 'mp3'")
        with pytest.raises(InvalidRequestError, match="repainting_end .0.5. must be greater than repainting_start"):
            offline.generate(repainting_start=1.0, repainting_end=0.5)
        with pytest.raises(UnknownFieldError, match="'duration' .did you mean 'audio_duration'"):
            offline.generate(duration=3)
        with pytest.raises(FileNotFoundError):
            offline.generate(task_type="repaint", src_audio="/no/such/song.wav")
    assert sent == []


def test_network_errors_and_proxy_answers_are_retried_then_reported():
    answers = iter([httpx.ConnectError("refused"), httpx.Response(502, text="<html>bad gateway</html>"),
                    httpx.Response(503, json={"detail": "Job registry unavailable; retry shortly"},
                                   headers={"Retry-After": "0"}),
                    httpx.Response(200, json={"job_id": "j1", "status": "queued", "queue_position": 1})])
    keys = []

    def answer(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["idempotency-key"])
        result = next(answers)
        if isinstance(result, Exception):
            raise result
        return result

    with Client("http://test", transport=httpx.MockTransport(answer), retry=FAST_RETRY) as flaky:
        assert flaky.generate(caption="x").id == "j1"
    assert len(keys) == 4 and len(set(keys)) == 1  # one Idempotency-Key for every try of one submit

    def refuse(request):
        raise httpx.ConnectError("refused")

    with Client("http://test", transport=httpx.MockTransport(refuse), retry=FAST_RETRY) as down:
        with pytest.raises(APIConnectionError, match="ConnectError"):
            down.job("j1").status()


def test_the_api_key_and_server_come_from_options_or_the_environment(monkeypatch):
    from acestep_client.cli import _parser

    monkeypatch.setenv("ACESTEP_SERVER", "http://music:9000")
    monkeypatch.setenv("ACESTEP_API_KEY", "from-env")
    args = _parser().parse_args(["status", "j1"])
    assert (args.server, args.api_key) == ("http://music:9000", "from-env")
    args = _parser().parse_args(["--api-key", "k1", "status", "j1", "--server", "http://other"])
    assert (args.server, args.api_key) == ("http://other", "k1")

    headers = []
    view = {"job_id": "j1", "status": "queued", "created_at": 0.0, "started_at": None, "finished_at": None,
            "queue_position": 1, "eta_seconds": 2.0, "avg_job_seconds": 2.0, "result": None, "error": None,
            "attempts": 0, "progress": {"stage": "queued", "step": 0, "total": 0}}

    def answer(request: httpx.Request) -> httpx.Response:
        headers.append(request.headers.get("authorization"))
        return httpx.Response(200, json=view)

    with Client("http://test", api_key="secret", transport=httpx.MockTransport(answer)) as keyed:
        with pytest.raises(WaitTimeoutError, match="j1 still queued after 0.2 s; it keeps running"):
            keyed.job("j1").wait(progress=False, timeout=0.2)
    assert headers and set(headers) == {"Bearer secret"}


# -- against the app ----------------------------------------------------------------------------------------------
def test_generate_wait_download(client, tmp_path):
    blocker = client.generate(**BLOCKER)
    job = client.generate(caption="client test", **SHORT)
    views = []

    def seen(view):
        views.append(view)
        if view.status == "queued":
            blocker.cancel()  # seen in line: let it run

    final = job.wait(progress=seen, timeout=180)
    assert final.status == "succeeded" and views[-1] == final
    assert statuses(views) == ["queued", "running", "succeeded"], [v.status for v in views]
    assert views[0].queue_position == 1
    assert any(v.progress.stage == "diffusion" and v.progress.total == 2 for v in views if v.status == "running")
    paths = job.download(tmp_path)
    assert paths == [tmp_path / f"{job.id}-1.mp3"]
    audio, rate = decode_audio(paths[0].read_bytes(), "mp3")
    assert (rate, audio.shape) == (48000, (2, 48000))
    assert job.download(tmp_path / "named", name="song") == [tmp_path / "named" / "song.mp3"]


def test_an_upload_goes_as_multipart(client, tmp_path):
    source = tmp_path / "source.wav"
    source.write_bytes(wav_bytes(1.0))
    job = client.generate(caption="repaint", task_type="repaint", src_audio=source, repainting_start=0.2,
                          repainting_end=0.6, audio_format="wav", **SHORT)
    view = job.wait(progress=False, timeout=180)
    assert view.result["audio_paths"][0].endswith(".wav")
    audio, rate = decode_audio(job.download(tmp_path)[0].read_bytes(), "wav")
    assert (rate, audio.shape) == (48000, (2, 48000))


def test_a_refused_request_raises_with_the_servers_detail(client):
    with pytest.raises(BadRequestError) as error:
        client.generate(task_type="lego", track_name="drums", src_audio=wav_bytes(1.0), **SHORT)
    assert error.value.status_code == 400
    assert error.value.detail.startswith("task_type: model 'acestep-v15-tiny' (turbo variant) does not serve lego")
    with pytest.raises(NotFoundError) as error:
        client.job("no-such-job").status()
    assert (error.value.status_code, error.value.detail) == (404, "Job not found")


def test_cancel(client):
    blocker = client.generate(**BLOCKER)
    job = client.generate(caption="to cancel", **SHORT)
    assert job.status().status == "queued"
    view = job.cancel()
    assert (view.status, view.error) == ("canceled", "canceled by the client")
    assert job.cancel().status == "canceled"  # again: a retried cancel finds its work done
    with pytest.raises(JobCanceledError):
        job.wait(progress=False)
    blocker.cancel()
    done = client.generate(caption="done", **SHORT)
    done.wait(progress=False, timeout=180)
    with pytest.raises(ConflictError) as error:
        done.cancel()
    assert (error.value.status_code, error.value.detail) == (409, "Job already succeeded")


class LoseFirstAnswer(httpx.BaseTransport):
    """Lets the server handle the first submit, then loses its answer, as a dropped connection would."""

    def __init__(self):
        self.inner, self.keys, self.lost = httpx.HTTPTransport(), [], None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST" and request.url.path.endswith("/v1/music/generate"):
            self.keys.append(request.headers["idempotency-key"])
            if self.lost is None:
                response.read()
                self.lost = json.loads(response.content)["job_id"]
                response.close()
                raise httpx.ReadError("connection lost after the server answered", request=request)
        return response


def test_a_retried_submit_makes_one_job(server):
    transport = LoseFirstAnswer()
    with Client(server, retry=FAST_RETRY, transport=transport) as lossy:
        before = httpx.get(server + "/v1/stats").json()["jobs"]["total"]
        job = lossy.generate(caption="retried", **SHORT)
        after = httpx.get(server + "/v1/stats").json()["jobs"]["total"]
        assert job.id == transport.lost  # the job the lost answer named
        assert len(transport.keys) == 2 and transport.keys[0] == transport.keys[1]
        assert after == before + 1
        job.wait(progress=False, timeout=180)


def test_cli(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("acestep_client.cli.RETRY", FAST_RETRY)
    common = ["--server", server]
    lyrics = tmp_path / "song.txt"
    lyrics.write_text("[verse]\nhello")
    source = tmp_path / "source.wav"
    source.write_bytes(wav_bytes(1.0))
    assert main([*common, "generate", "cli song", "--lyrics-file", str(lyrics), "--duration", "1", "--steps", "2",
                 "--batch-size", "2", "-o", str(tmp_path / "song.flac")]) == 0
    out, err = capsys.readouterr()
    written = [tmp_path / "song-1.flac", tmp_path / "song-2.flac"]
    assert out.split() == [str(p) for p in written]
    for path in written:
        audio, rate = decode_audio(path.read_bytes(), "flac")
        assert (rate, audio.shape) == (48000, (2, 48000))
    job_id = err.split("job ", 1)[1].split()[0]
    assert "succeeded" in err and "diffusion" in err  # the bar's stages

    assert main([*common, "status", job_id]) == 0
    view = json.loads(capsys.readouterr().out)
    assert (view["job_id"], view["status"]) == (job_id, "succeeded")
    assert view["result"]["metas"]["lyrics"] == "[verse]\nhello"
    assert main([*common, "download", job_id, "-o", str(tmp_path / "again"), "--no-progress"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "again" / f"{job_id}-{n}.flac") for n in (1, 2)]

    assert main([*common, "cancel", job_id]) == 1
    out, err = capsys.readouterr()
    assert err == "acestep: error: Job already succeeded\n"
    assert main([*common, "generate", "lego", "--task", "lego", "--src-audio", str(source), "--duration", "1"]) == 1
    err = capsys.readouterr().err
    assert "does not serve lego" in err and "Traceback" not in err
    assert main([*common, "generate", "x", "--steps", "500"]) == 2
    assert capsys.readouterr().err.startswith("acestep: error: inference_steps: Input should be less than or equal")
    assert main([*common, "generate", "x", "-o", str(tmp_path / "song.txt2")]) == 2
    assert "cannot tell the format from .txt2" in capsys.readouterr().err
    assert main(["--server", "http://127.0.0.1:1", "status", job_id]) == 1  # nothing listens: retried, then said
    assert "ConnectError" in capsys.readouterr().err


def test_cli_ctrl_c_leaves_the_job_running(server, client, tmp_path):
    blocker = client.generate(**BLOCKER)  # keeps the CLI's job in line until the interrupt
    env = {**os.environ, "ACESTEP_SERVER": server, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "acestep_client.cli", "generate", "interrupted", "--duration",
                                "1", "--steps", "2", "--batch-size", "1", "-o", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    line = process.stderr.readline()
    assert "submitted" in line, line + process.stderr.read()
    job_id = line.split("job ", 1)[1].split()[0]
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert f"job {job_id} keeps running" in err and "Traceback" not in err
    assert client.job(job_id).status().status in ("queued", "running")
    client.job(job_id).cancel()
    blocker.cancel()


def test_async_client(server, tmp_path):
    async def run() -> None:
        async with AsyncClient(server, retry=FAST_RETRY) as aclient:
            with pytest.raises(InvalidRequestError):
                await aclient.generate(batch_size=9)
            blocker = await aclient.generate(**BLOCKER)
            job = await aclient.generate(caption="async", audio_format="opus", **SHORT)
            views, queued = [], asyncio.Event()

            def seen(view):
                views.append(view)
                if view.status == "queued":
                    queued.set()

            waiting = asyncio.create_task(job.wait(progress=seen, timeout=180))
            await queued.wait()
            assert (await blocker.cancel()).status == "canceled"
            await waiting
            assert statuses(views) == ["queued", "running", "succeeded"]
            (path,) = await job.download(tmp_path)
            assert path == tmp_path / f"{job.id}-1.opus"
            audio, rate = decode_audio(path.read_bytes(), "opus")
            assert (rate, audio.shape) == (48000, (2, 48000))
            with pytest.raises(BadRequestError, match="does not serve lego"):
                await aclient.generate(task_type="lego", src_audio=wav_bytes(1.0))
            queued = await aclient.generate(**BLOCKER)
            assert (await queued.cancel()).status == "canceled"

    asyncio.run(run())
