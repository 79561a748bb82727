"""Webhooks over real HTTP: a loopback receiver gets signed start/completed events, a failed attempt is retried, and
targets the server must not call are refused at submit."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from jobs.webhooks import verify
from tests.conftest import deployed
from tests.deployments.conftest import wait_for

SECRET = "whsec_http_test"
JOB = {"caption": "test", "audio_duration": 1.0, "inference_steps": 2, "batch_size": 1}


class Receiver:
    """Answers 500 to its first request (the delivery must be retried), then 200."""

    def __init__(self):
        self.received: list[tuple[dict, bytes]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.received.append((dict(self.headers), body))
                self.send_response(500 if len(owner.received) == 1 else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def retried(self) -> list[dict]:
        """The headers of each later request that carries the first (500-answered) request's delivery id."""
        first = self.received[0][0]["X-ACEStep-Delivery"] if self.received else None
        return [h for h, _ in self.received[1:] if h["X-ACEStep-Delivery"] == first]

    def payloads(self, job_id: str) -> list[tuple[dict, dict]]:
        return [(h, json.loads(b)) for h, b in self.received if json.loads(b)["job_id"] == job_id]


@pytest.fixture(scope="module")
def hooked(serve_http, dirs):
    args = {"name": "webhook-test",
            "queue": {"max_queued_jobs": 10, "max_running_jobs": 2, "default_duration_s": 1.0,
                      "webhooks": {"secret": SECRET, "allow_private": True, "max_backoff_s": 0.5}},
            "files": {"output_dir": str(dirs["results"]), "upload_dir": str(dirs["uploads"]),
                      "journal_path": str(dirs["journal"])}}
    with deployed(args, "webhook-test", "/hooks", serve_http) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


def test_signed_events_arrive_and_a_failed_attempt_is_retried(hooked):
    receiver = Receiver()
    try:
        answer = hooked.post("/v1/music/generate", json={**JOB, "webhook": receiver.url})
        assert answer.status_code == 200, answer.text
        job_id = answer.json()["job_id"]
        view = wait_for(hooked, job_id)
        assert view["status"] == "succeeded", view
        # The upstream API takes it too, under upstream's spelling, and only the event it asks for.
        task = hooked.post("/release_task", json={**JOB, "callback_url": receiver.url,
                                                   "webhook_events": ["completed"]})
        assert task.status_code == 200, task.text
        task_id = task.json()["data"]["task_id"]
        wait_for(hooked, task_id)
        deadline = time.time() + 30  # every event, and the 500-answered delivery again (its retry may come last)
        while time.time() < deadline and ({p["event"] for _, p in receiver.payloads(job_id)} != {"start", "completed"}
                                          or not receiver.payloads(task_id) or not receiver.retried()):
            time.sleep(0.1)
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
    events = receiver.payloads(job_id)
    assert len(receiver.received) >= 4  # the 500 answered, then start, completed and the upstream job's completed
    first = json.loads(receiver.received[0][1])
    assert receiver.retried(), f"the delivery that got a 500 ({first['event']}) was not sent again"
    for headers, body in receiver.received:
        assert verify(SECRET, headers["X-ACEStep-Signature"], body)
        assert headers["X-ACEStep-Event"] == json.loads(body)["event"]
    completed = next(p for _, p in events if p["event"] == "completed")
    assert completed["status"] == "succeeded" and completed["job"]["result"] == view["result"]
    assert [p["event"] for _, p in receiver.payloads(task_id)] == ["completed"]


@pytest.mark.parametrize("url,why", [("http://10.0.0.7/hook", "private address 10.0.0.7"),
                                     ("http://127.0.0.1:9/hook", "loopback address"),
                                     ("http://169.254.169.254/latest", "link-local"),
                                     ("file:///etc/passwd", "scheme must be http or https"),
                                     ("http://8.8.8.8/hook", "no webhook secret")])
def test_refused_targets_are_400_at_submit(client, url, why):
    """The default app: allow_private false and no secret."""
    answer = client.post("/v1/music/generate", json={**JOB, "webhook": url})
    assert answer.status_code == 400 and why in answer.json()["detail"], answer.text
