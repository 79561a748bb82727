"""`GET /v1/jobs/{id}/events`: a job's view as Server-Sent Events. The stream's loop on a fake registry (heartbeats,
the ETA bucket, the end, a client that goes), then over real HTTP against the tiny app: a job's events in order up
to `end`, a reconnect with Last-Event-ID, 404s, no request left behind by a closed stream, and the Python client
following jobs by the stream (falling back to long-polls on a server without one)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import httpx
import pytest
import ray

from acestep_client import AsyncClient, Client, NotFoundError, RetryPolicy
from acestep_client.event_stream import EventStreamDecoder, ServerEvent
from deployments import envs
from deployments.events import KEEP_ALIVE, first_event_id, job_events, open_job_events
from deployments.ingress import FinishedViews, RequireApiKey
from tests.deployments.conftest import submit

LONG = {"caption": "long", "audio_duration": 60.0, "inference_steps": 200, "batch_size": 1}  # runs until canceled
SHORT = {"caption": "short", "audio_duration": 1.0, "inference_steps": 2, "batch_size": 1}
FAST_RETRY = RetryPolicy(retries=3, backoff_s=0.01, max_backoff_s=0.05)


def fake_view(status="queued", position=1, stage="queued", step=0, eta=10.0) -> dict:
    return {"job_id": "j1", "status": status, "created_at": 1.0, "started_at": None, "finished_at": 2.0,
            "queue_position": position, "eta_seconds": eta, "avg_job_seconds": 3.0, "result": None,
            "error": None, "attempts": 0, "progress": {"stage": stage, "step": step, "total": 8}}


def decode(chunks: list[bytes]) -> list[ServerEvent | str]:
    """Events, and ": ..." for each comment line, in order."""
    decoder, out = EventStreamDecoder(), []
    for line in b"".join(chunks).decode().splitlines():
        if line.startswith(":"):
            out.append(line)
        elif (event := decoder.feed(line)) is not None:
            out.append(event)
    return out


# -- the loop, on a fake registry ---------------------------------------------------------------------------------
def test_a_change_is_an_event_no_change_a_keep_alive_and_the_end_closes():
    later = [fake_view(eta=10.4),  # the same bucket: a keep-alive
             fake_view(eta=30.0),  # the estimate moved: an event
             fake_view("running", 0, "diffusion", 1, None), fake_view("running", 0, "diffusion", 1, None),
             fake_view("succeeded", 0, "done", 0, None), fake_view("succeeded")]  # never asked for
    waits, ended = [], []

    async def next_view(wait_s, since=None):
        waits.append(wait_s)
        return later.pop(0)

    async def collect():
        return [c async for c in job_events(fake_view(), next_view, 5, lambda body, v: ended.append(body),
                                            heartbeat_s=0.01)]

    chunks = asyncio.run(collect())
    assert chunks[1] == chunks[4] == KEEP_ALIVE == b": keep-alive\n\n"
    events = [e for e in decode(chunks) if isinstance(e, ServerEvent)]
    assert [(e.event, e.id) for e in events] == [("job", "5"), ("job", "6"), ("job", "7"), ("end", "8")]
    assert [json.loads(e.data)["eta_seconds"] for e in events[:2]] == [10.0, 30.0]
    assert json.loads(events[-1].data) == fake_view("succeeded", 0, "done", 0, None)
    assert ended == [events[-1].data.encode()] and waits == [0.01] * 5 and len(later) == 1


def test_a_job_the_registry_forgets_ends_the_stream_without_end():
    async def next_view(wait_s, since=None):
        return None

    async def collect():
        return [c async for c in job_events(fake_view(), next_view, 1)]

    assert [e.event for e in decode(asyncio.run(collect()))] == ["job"]


@pytest.mark.parametrize("header,first", [(None, 1), ("7", 8), (" 41 ", 42), ("abc", 1), ("-3", 1), ("9" * 40, 1),
                                          ("٣", 1)])
def test_event_ids_count_on_from_last_event_id(header, first):
    assert first_event_id(header) == first


def test_the_decoder_reads_the_spec_format():
    decoder = EventStreamDecoder()
    lines = [": keep-alive", "", "event: job", "data: {\"a\":", "data:1}", "id: 4", "retry: 10", "", "data: x", ""]
    events = [e for line in lines if (e := decoder.feed(line)) is not None]
    assert events == [ServerEvent("job", '{"a":\n1}', "4"), ServerEvent("message", "x", "4")]


class FakeRegistry:
    """A job that never changes: each long-poll waits its full wait (the registry's behaviour), so a stream would
    run for ever unless its client goes."""

    def __init__(self):
        self.calls, self.pending = 0, 0

    async def call(self, method, job_id, wait_s=0.0, since=None):
        self.calls += 1
        self.pending += 1
        try:
            await asyncio.sleep(wait_s)
        finally:
            self.pending -= 1
        return fake_view() if job_id == "j1" else None


def test_a_client_that_goes_stops_the_loop():
    """Starlette's StreamingResponse cancels the body on `http.disconnect`: the pending registry call is cancelled
    and nothing asks the registry again."""
    registry = FakeRegistry()

    async def run():
        assert await open_job_events(registry, FinishedViews(60), "nope", None) is None
        response = await open_job_events(registry, FinishedViews(60), "j1", None)
        sent, gone = [], asyncio.Event()

        async def send(message):
            sent.append(message)
            if message.get("body"):
                gone.set()  # the first event is out: the client now hangs up

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}

        await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send), 5)
        await asyncio.sleep(0.05)
        return sent

    sent = asyncio.run(run())
    assert sent[0]["status"] == 200 and b"event: job" in sent[1]["body"]
    assert dict(sent[0]["headers"])[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert registry.pending == 0 and registry.calls == 3  # 404 check, first view, the one long-poll cancelled


def test_the_stream_needs_the_api_key_when_keys_are_configured(monkeypatch):
    """The ingress' middleware, in-process (no app with keys deployed here): the stream's path is no probe."""
    monkeypatch.setattr(envs, "API_KEY_SHA256", [hashlib.sha256(b"k3y").hexdigest()])
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def run(headers):
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": "/v1/jobs/j1/events", "headers": headers, "method": "GET"}
        await RequireApiKey(app)(scope, None, send)
        return sent

    refused = asyncio.run(run([]))
    assert refused[0]["status"] == 401 and json.loads(refused[1]["body"]) == {"detail": "Missing or invalid API key"}
    assert asyncio.run(run([(b"authorization", b"Bearer k3y")])) == [] and reached == ["/v1/jobs/j1/events"]


# -- over HTTP ----------------------------------------------------------------------------------------------------
def read_events(client: httpx.Client, job_id: str, headers: dict | None = None, limit: int | None = None,
                timeout: float = 120) -> list[ServerEvent]:
    """The stream's events until it closes (or `limit` of them, then hang up)."""
    decoder, events, deadline = EventStreamDecoder(), [], time.monotonic() + timeout
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=30) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        for line in response.iter_lines():
            assert time.monotonic() < deadline, events
            if (event := decoder.feed(line)) is not None:
                events.append(event)
                if len(events) == limit:
                    break
    return events


def long_job(client: httpx.Client) -> str:
    response = submit(client, json=LONG)
    assert response.status_code == 200, response.text
    return response.json()["job_id"]


def test_a_jobs_events_in_order_up_to_its_end(client):
    job_id = submit(client, json=SHORT).json()["job_id"]
    started = time.monotonic()
    events = read_events(client, job_id)
    views = [json.loads(e.data) for e in events]
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert [e.event for e in events] == ["job"] * (len(events) - 1) + ["end"]
    order = ["queued", "running", "succeeded"]
    statuses = [v["status"] for v in views]
    assert statuses == sorted(statuses, key=order.index) and statuses[-1] == "succeeded", statuses
    assert statuses[0] in ("queued", "running")
    changes = [(v["status"], v["queue_position"], v["progress"]["stage"], v["progress"]["step"]) for v in views]
    assert all(a != b for a, b in zip(changes, changes[1:])), changes  # an event per change, none without one
    assert events[-1].data == client.get(f"/v1/jobs/{job_id}").text  # the poll's body, byte for byte
    print(f"\n{len(events)} events in {time.monotonic() - started:.1f} s: {changes}")


def test_a_reconnect_gets_the_current_view_at_once(client):
    job_id = long_job(client)
    try:
        first = read_events(client, job_id, limit=1)[0]
        started = time.monotonic()
        again = read_events(client, job_id, headers={"Last-Event-ID": first.id}, limit=1)[0]
        assert time.monotonic() - started < 5  # not after a heartbeat's wait
        assert (again.event, again.id) == ("job", str(int(first.id) + 1))
        now = client.get(f"/v1/jobs/{job_id}").json()
        assert json.loads(again.data)["status"] == now["status"] in ("queued", "running")
    finally:
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    # a finished job's stream: its final view alone (from the ingress' cache once seen), then the end
    for _ in range(2):
        events = read_events(client, job_id, headers={"Last-Event-ID": "41"})
        assert [(e.event, e.id, json.loads(e.data)["status"]) for e in events] == [("end", "42", "canceled")]


def test_an_unknown_job_is_a_404_not_a_stream(client):
    for job_id in ("00000000-0000-0000-0000-000000000000", "x" * 65):
        response = client.get(f"/v1/jobs/{job_id}/events")
        assert response.status_code == 404 and response.headers["content-type"] == "application/json"
        assert response.json() == {"detail": "Job not found"}
    # what an older server answers for the route itself (the client tells the two apart)
    assert client.get("/v1/jobs/x/no-such-route").json() == {"detail": "Not Found"}
    spec = client.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}/events"]["get"]
    assert set(spec["responses"]) == {"200", "401", "404", "422", "503"}
    assert set(spec["responses"]["200"]["content"]) == {"text/event-stream"}
    assert [p["name"] for p in spec["parameters"]] == ["job_id", "Last-Event-ID"]


def ingress_ongoing_requests(app: str) -> int:
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{app}#Ingress#")]
    assert len(replicas) == 1, replicas
    actor = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    return ray.get(actor.get_num_ongoing_requests.remote())


def test_a_closed_stream_leaves_no_request_behind(client):
    job_id = long_job(client)
    try:
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(lines) == "event: job"
            time.sleep(0.5)
            assert ingress_ongoing_requests("api-test") == 1
        deadline = time.monotonic() + 10
        while (ongoing := ingress_ongoing_requests("api-test")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ongoing == 0
    finally:
        client.post(f"/v1/jobs/{job_id}/cancel")


# -- the Python client --------------------------------------------------------------------------------------------
class Recorder(httpx.BaseTransport):
    """Real HTTP, every request noted; `old_server` answers the event route as a server without it does, and
    `cut_first_stream` drops the first stream after its first chunk (a network error)."""

    def __init__(self, old_server=False, cut_first_stream=False):
        self.inner, self.old_server, self.cut = httpx.HTTPTransport(), old_server, cut_first_stream
        self.requests: list[tuple[str, str | None]] = []  # (path?query, Last-Event-ID)

    def handle_request(self, request):
        self.requests.append((request.url.raw_path.decode(), request.headers.get("last-event-id")))
        if self.old_server and request.url.path.endswith("/events"):
            return httpx.Response(404, json={"detail": "Not Found"})
        response = self.inner.handle_request(request)
        if self.cut and request.url.path.endswith("/events"):
            self.cut = False
            response.stream = CutAfterFirstChunk(response.stream)
        return response

    def paths(self) -> list[str]:
        return [path.split("/")[-1] for path, _ in self.requests]


class AsyncRecorder(httpx.AsyncBaseTransport):
    def __init__(self):
        self.inner, self.requests = httpx.AsyncHTTPTransport(), []

    async def handle_async_request(self, request):
        self.requests.append(request.url.raw_path.decode())
        return await self.inner.handle_async_request(request)


class CutAfterFirstChunk(httpx.SyncByteStream):
    def __init__(self, stream):
        self.stream = stream

    def __iter__(self):
        for chunk in self.stream:
            yield chunk
            raise httpx.ReadError("cut")

    def close(self):
        self.stream.close()


def test_the_clients_wait_follows_the_stream(api):
    transport = Recorder(cut_first_stream=True)
    with Client(api, retry=FAST_RETRY, transport=transport) as sdk:
        job = sdk.generate(**SHORT)
        views = []
        final = job.wait(progress=views.append, timeout=120)
    assert final.status == "succeeded" and views[-1] == final and views[0].status in ("queued", "running")
    paths = transport.paths()
    assert paths == ["generate", "events", "events"], paths  # the cut stream was resumed; no poll
    assert transport.requests[1][1] is None and transport.requests[2][1] == "1"  # Last-Event-ID: the first event's

    async def follow():
        async with AsyncClient(api, retry=FAST_RETRY, transport=AsyncRecorder()) as sdk:
            job = await sdk.generate(**SHORT)
            return await job.wait(progress=False, timeout=120), sdk._http._transport.requests

    final, requests = asyncio.run(follow())
    assert final.status == "succeeded" and [p.split("/")[-1] for p in requests] == ["generate", "events"], requests


def test_the_client_long_polls_a_server_without_the_stream_and_knows_an_unknown_job(api):
    transport = Recorder(old_server=True)
    with Client(api, retry=FAST_RETRY, transport=transport) as sdk:
        first, second = sdk.generate(**SHORT), sdk.generate(**SHORT)
        assert first.wait(progress=False, timeout=120).status == "succeeded"
        assert second.wait(progress=False, timeout=120).status == "succeeded"
    paths = transport.paths()
    assert paths.count("events") == 1 and paths[3].startswith(first.id), paths  # asked once, then long-polls
    assert any("?wait=" in path for path, _ in transport.requests), transport.requests

    transport = Recorder()
    with Client(api, retry=FAST_RETRY, transport=transport) as sdk:
        with pytest.raises(NotFoundError) as error:
            sdk.job("no-such-job").wait(progress=False)
    assert error.value.detail == "Job not found" and transport.paths() == ["events"]  # no fallback to polls
