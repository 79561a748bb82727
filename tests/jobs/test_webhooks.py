"""Webhooks: target checks, signatures, backoff, and delivery from the registry (plain class, loopback receiver)."""

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.config import FilesConfig, QueueConfig, WebhookConfig
from jobs.registry import JobRegistry
from jobs.schemas import GenerateRequest, normalize_payload
from jobs.webhooks import (WebhookRefused, WebhookSender, backoff_s, check_target, forbidden_reason, new_delivery,
                           sign, signature_header, verify)

SECRET = "whsec_test"


def run(coro):
    return asyncio.run(coro)


class Receiver:
    """An HTTP receiver on loopback that answers 500 to its first `fail` requests, then 204."""

    def __init__(self, fail: int = 0):
        self.fail, self.received = fail, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.received.append((dict(self.headers), body))
                failing = len(owner.received) <= owner.fail
                self.send_response(500 if failing else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self):
        return [json.loads(body)["event"] for _, body in self.received]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def loopback_config(**kwargs) -> WebhookConfig:
    return WebhookConfig(**{"secret": SECRET, "allow_private": True, "max_backoff_s": 0.05, **kwargs})


def test_signature_round_trip_and_refusals():
    body = b'{"event": "start"}'
    header = signature_header(SECRET, 1700000000, body)
    assert header == f"t=1700000000,v1={sign(SECRET, 1700000000, body)}"
    assert verify(SECRET, header, body, now=1700000100)
    assert not verify(SECRET, header, body + b" ", now=1700000100)  # body changed
    assert not verify("other", header, body, now=1700000100)  # other key
    assert not verify(SECRET, header, body, now=1700001000)  # replayed too late
    assert not verify(SECRET, "v1=abc", body)


def test_backoff_doubles_up_to_the_cap():
    assert [backoff_s(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_s(1000, cap=5) == 5


@pytest.mark.parametrize("address,reason", [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("169.254.169.254", "link-local"),
    ("224.0.0.1", "multicast"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("fe80::1", "link-local"),
    ("100.64.0.1", "non-global"), ("0.0.0.0", "unspecified"), ("8.8.8.8", None), ("2606:4700::1111", None)])
def test_forbidden_addresses(address, reason):
    got = forbidden_reason(address)
    assert (got is None) if reason is None else (got is not None)


@pytest.mark.parametrize("url,config,why", [
    ("ftp://example.com/x", WebhookConfig(), "scheme"),
    ("http://127.0.0.1:9/x", WebhookConfig(), "loopback"),
    ("http://localhost/x", WebhookConfig(), "loopback"),
    ("http://[::1]/x", WebhookConfig(), "loopback"),
    ("http://10.0.0.1/x", WebhookConfig(), "private"),
    ("http://169.254.169.254/latest", WebhookConfig(), "link-local"),
    ("http://user:pw@127.0.0.1/", WebhookConfig(allow_private=True), "credentials"),
    ("http://127.0.0.1/x", WebhookConfig(allow_private=True, allowed_hosts=["hooks.example.com"]), "allowed_hosts"),
])
def test_check_target_refuses(url, config, why):
    with pytest.raises(WebhookRefused, match=why):
        run(check_target(url, config))


def test_check_target_allows():
    assert run(check_target("http://127.0.0.1:9/x", WebhookConfig(allow_private=True))) == ["127.0.0.1"]
    config = WebhookConfig(allow_private=True, allowed_hosts=["*.localhost", "127.0.0.1"])
    assert run(check_target("https://127.0.0.1/x", config)) == ["127.0.0.1"]


def test_request_fields_and_aliases():
    raw = {"callback_url": "http://h/x", "webhookEvents": "completed"}
    params = GenerateRequest.model_validate(normalize_payload(raw))
    assert (params.webhook, params.webhook_events) == ("http://h/x", ["completed"])
    assert GenerateRequest().webhook_events == ["start", "completed"]
    with pytest.raises(ValueError):
        GenerateRequest(webhook_events=["finished"])


def test_delivery_refused_at_send_time_is_not_retried():
    """DNS rebinding: a target allowed at submit but private now fails at once."""
    async def scenario():
        done = []
        sender = WebhookSender(lambda: WebhookConfig(secret=SECRET), lambda *a: done.append(a))
        sender.schedule("j", "http://127.0.0.1:9/x", new_delivery("start", {"job_id": "j", "status": "running"}))
        await asyncio.wait_for(asyncio.gather(*sender.tasks.values()), 5)
        [(job_id, _, outcome)] = done
        assert job_id == "j" and outcome.startswith("refused") and "loopback" in outcome
    run(scenario())


def test_delivery_gives_up_after_max_age():
    async def scenario():
        done = []
        sender = WebhookSender(lambda: loopback_config(max_age_s=0.3), lambda *a: done.append(a))
        sender.schedule("j", "http://127.0.0.1:9/x", new_delivery("start", {"job_id": "j", "status": "running"}))
        await asyncio.wait_for(asyncio.gather(*sender.tasks.values()), 5)
        assert "max_age_s" in done[0][2]
    run(scenario())


async def _until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_registry_sends_start_and_completed_signed_and_retries():
    receiver = Receiver(fail=1)  # the first attempt gets a 500

    async def scenario():
        reg = JobRegistry(QueueConfig(webhooks=loopback_config()))
        spec = {"request": GenerateRequest(webhook=receiver.url).model_dump(mode="json")}
        await reg.submit("j", spec)
        await reg.lease("d", 1, wait_s=0)
        await reg.finish("j#1", "d", {"ok": True})
        await _until(lambda: not reg.jobs["j"].webhooks)
        return reg

    try:
        run(scenario())
        # start and completed, and the one of them that reached the receiver first (and got its 500) again
        assert len(receiver.received) == 3 and set(receiver.events()) == {"start", "completed"}
        ids = []
        for headers, body in receiver.received:
            assert verify(SECRET, headers["X-ACEStep-Signature"], body)
            payload = json.loads(body)
            assert headers["X-ACEStep-Event"] == payload["event"]
            ids.append((payload["event"], headers["X-ACEStep-Delivery"]))
            assert payload["job_id"] == "j" and payload["job"]["job_id"] == "j"
        assert ids[0] in ids[1:] and len(set(ids)) == 2  # the retry carries the same delivery id
        completed = json.loads(next(b for _, b in receiver.received if json.loads(b)["event"] == "completed"))
        assert completed["status"] == "succeeded" and completed["job"]["result"]["ok"] is True
    finally:
        receiver.close()


def test_canceled_job_sends_completed_only_when_asked():
    receiver = Receiver()

    async def scenario():
        reg = JobRegistry(QueueConfig(webhooks=loopback_config()))
        spec = {"request": GenerateRequest(webhook=receiver.url, webhook_events=["completed"]).model_dump(mode="json")}
        await reg.submit("j", spec)
        await reg.cancel("j")
        await _until(lambda: not reg.jobs["j"].webhooks)

    try:
        run(scenario())
        assert receiver.events() == ["completed"]
        assert json.loads(receiver.received[0][1])["status"] == "canceled"
    finally:
        receiver.close()


def test_pending_delivery_survives_a_registry_restart(tmp_path):
    """The receiver is down while the job ends; a registry restarted from the journal delivers the event."""
    receiver = Receiver()
    url = receiver.url
    receiver.close()  # down: connection refused
    files = FilesConfig(output_dir=str(tmp_path / "out"), upload_dir=str(tmp_path / "up"),
                        journal_path=str(tmp_path / "journal.sqlite3"))
    config = QueueConfig(webhooks=loopback_config(max_backoff_s=30))

    async def first():
        reg = JobRegistry(config, files)
        spec = {"request": GenerateRequest(webhook=url, webhook_events=["completed"]).model_dump(mode="json")}
        await reg.submit("j", spec)
        await reg.cancel("j")
        await asyncio.sleep(0.2)  # one refused attempt; the next is 1 s away
        assert len(reg.jobs["j"].webhooks) == 1
        await reg._durable()
        for task in reg.webhook_sender.tasks.values():  # the actor dies
            task.cancel()

    run(first())
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    received = []  # the receiver comes back on the same port, so the recorded URL reaches it

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def second():
        reg = JobRegistry(config, files)  # recovery schedules the pending delivery ...
        assert len(reg.webhook_sender.backlog) + len(reg.webhook_sender.tasks) == 1
        await reg.view("j")  # ... which starts now (or, where no loop ran the constructor, at the next call)
        await _until(lambda: not reg.jobs["j"].webhooks)
        await reg._durable()
        assert JobRegistry(config, files).jobs["j"].webhooks == []  # delivered: gone from the journal too

    try:
        run(second())
        assert [json.loads(b)["event"] for b in received] == ["completed"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_retried_attempt_sends_no_second_start():
    receiver = Receiver()

    async def scenario():
        reg = JobRegistry(QueueConfig(webhooks=loopback_config(), max_attempts=2))
        spec = {"request": GenerateRequest(webhook=receiver.url, webhook_events=["start"]).model_dump(mode="json")}
        await reg.submit("j", spec)
        await reg.lease("d1", 1, wait_s=0)
        await reg.fail("j#1", "d1", "replica died", retry=True)
        [again] = await reg.lease("d2", 1, wait_s=0)
        assert again["attempt"] == 2
        await reg.finish("j#2", "d2", {})
        await _until(lambda: not reg.jobs["j"].webhooks)
        start = json.loads(receiver.received[0][1])
        assert start["status"] == "running" and start["job"]["attempts"] == 1
        assert start["job"]["progress"]["stage"] == "starting"

    try:
        run(scenario())
        assert receiver.events() == ["start"]
    finally:
        receiver.close()
