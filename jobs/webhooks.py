"""Job event webhooks: where a callback may go (SSRF checks), how it is signed, and its delivery with retries.

A job submitted with `webhook` gets a POST for each event it asked for (`webhook_events`): `start` when it is first
leased (status running) and `completed` when it ends (succeeded, failed or canceled). The registry keeps each pending
delivery in the job's record (journaled), so a restarted registry sends again what was not yet answered with a 2xx:
delivery is at least once, and receivers dedup on the `X-ACEStep-Delivery` id. Each delivery is retried after 1, 2,
4 ... s (at most `max_backoff_s` apart) until it is `max_age_s` old.

Signature, as Stripe's and Standard Webhooks': `X-ACEStep-Signature: t=<unix seconds>,v1=<hex>` where `<hex>` is
HMAC-SHA256(secret, f"{t}.{body}"), body being the exact bytes POSTed; receivers recompute it, compare in constant
time and refuse a `t` far from their clock (replays). `verify` does all three.

The target is checked at submit and again before every attempt (the name may resolve elsewhere by then: DNS
rebinding): http(s) only, its host in `allowed_hosts` when that is set, and every A/AAAA record public unless
`allow_private`. A target refused at delivery time fails the delivery at once (no retries). Redirects are not
followed (they could lead anywhere).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import uuid
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx

from deployments import envs
from jobs.config import WebhookConfig

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-ACEStep-Signature"
EVENT_HEADER = "X-ACEStep-Event"
DELIVERY_HEADER = "X-ACEStep-Delivery"


class WebhookRefused(ValueError):
    """A webhook target this server does not call; the message says why."""


def signing_secret(config: WebhookConfig) -> str | None:
    return config.secret or envs.ACESTEP_WEBHOOK_SECRET


# -- targets -----------------------------------------------------------------------------------------------------
def _split(url: str, config: WebhookConfig) -> tuple[str, int]:
    """(host, port) of an http(s) URL whose host the allow-list admits; no DNS yet."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".").lower()
    except ValueError as exc:  # "http://[bad"
        raise WebhookRefused(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused(f"scheme must be http or https (got {parts.scheme or 'none'!r})")
    if not host:
        raise WebhookRefused("URL has no host")
    if parts.username or parts.password:
        raise WebhookRefused("URL must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookRefused("URL has an invalid port") from None
    if config.allowed_hosts and not any(_host_matches(host, pattern) for pattern in config.allowed_hosts):
        raise WebhookRefused(f"host {host!r} is not in this server's allowed_hosts")
    return host, port


def _host_matches(host: str, pattern: str) -> bool:
    pattern = pattern.rstrip(".").lower()
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def forbidden_reason(address: str) -> str | None:
    """Why an IP address is no webhook target (loopback, private ...), or None for a public one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):  # most specific first
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:  # shared address space (100.64/10) and the like
        return "non-global"
    return None


async def check_target(url: str, config: WebhookConfig) -> list[str]:
    """Refuse (`WebhookRefused`) a URL this server must not call; else the addresses its host resolves to. The
    resolution runs in the loop's resolver thread, never blocking it."""
    host, port = _split(url, config)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as exc:  # unknown name, or no name at all ("a\x00b")
        raise WebhookRefused(f"host {host!r} does not resolve ({exc})") from None
    addresses = sorted({info[4][0] for info in infos})
    if not config.allow_private:
        for address in addresses:
            reason = forbidden_reason(address)
            if reason:
                raise WebhookRefused(f"host {host!r} resolves to {reason} address {address}, which this server "
                                     f"does not call (allow_private is false)")
    return addresses


# -- signing -----------------------------------------------------------------------------------------------------
def sign(secret: str, timestamp: int, body: bytes) -> str:
    """HMAC-SHA256 hex of f"{timestamp}.{body}"."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={sign(secret, timestamp, body)}"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """A receiver's check: the header's `v1` is the body's signature at its `t`, and `t` is within `tolerance_s`."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body)
    return any(hmac.compare_digest(expected, given) for given in fields.get("v1", []))


# -- delivery ----------------------------------------------------------------------------------------------------
def backoff_s(attempt: int, cap: float = 60.0) -> float:
    """Seconds before attempt `attempt + 1` (the first retry waits 1 s): 1, 2, 4 ... capped at `cap`."""
    return min(2.0 ** min(attempt, 30), cap)


def new_delivery(event: str, job_view: dict[str, Any], at: float | None = None) -> dict[str, Any]:
    """A pending delivery, as the job record keeps it: the body is fixed now, so every retry sends the same bytes."""
    at = time.time() if at is None else at
    body = {"event": event, "job_id": job_view["job_id"], "status": job_view["status"], "timestamp": at,
            "job": job_view}
    return {"id": str(uuid.uuid4()), "event": event, "created_at": at, "body": json.dumps(body)}


class WebhookSender:
    """Runs deliveries as tasks on the registry's event loop (the HTTP waits are async; nothing blocks the loop).

    `done(job_id, delivery_id, outcome)` is called when a delivery ends: "delivered", or why it was dropped.
    Deliveries scheduled where no loop runs (the registry's recovery in its constructor) wait in a backlog that
    `flush()` starts.
    """

    def __init__(self, config: Callable[[], WebhookConfig], done: Callable[[str, str, str], None]):
        self._config, self._done = config, done
        self.tasks: dict[str, asyncio.Task] = {}  # delivery id -> its task
        self.backlog: list[tuple[str, str, dict[str, Any]]] = []
        self._client: httpx.AsyncClient | None = None

    def schedule(self, job_id: str, url: str, delivery: dict[str, Any]) -> None:
        if delivery["id"] in self.tasks:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.backlog.append((job_id, url, delivery))
            return
        task = loop.create_task(self._run(job_id, url, delivery))
        self.tasks[delivery["id"]] = task
        task.add_done_callback(lambda _: self.tasks.pop(delivery["id"], None))

    def flush(self) -> None:
        backlog, self.backlog = self.backlog, []
        for item in backlog:
            self.schedule(*item)

    async def _run(self, job_id: str, url: str, delivery: dict[str, Any]) -> None:
        body = delivery["body"].encode()
        attempt = 0
        while True:
            config = self._config()
            if time.time() - delivery["created_at"] > config.max_age_s:
                outcome = f"dropped after {attempt} attempts: older than max_age_s ({config.max_age_s:g} s)"
                break
            secret = signing_secret(config)
            if secret is None:
                outcome = "dropped: no webhook secret configured"
                break
            try:
                await check_target(url, config)  # again: the name may point elsewhere now (DNS rebinding)
            except WebhookRefused as exc:
                outcome = f"refused: {exc}"
                break
            timestamp = int(time.time())
            headers = {"Content-Type": "application/json", "User-Agent": "acestep-webhooks",
                       SIGNATURE_HEADER: signature_header(secret, timestamp, body),
                       EVENT_HEADER: delivery["event"], DELIVERY_HEADER: delivery["id"]}
            try:
                response = await self._http().post(url, content=body, headers=headers, timeout=config.timeout_s)
                if 200 <= response.status_code < 300:
                    outcome = "delivered"
                    break
                why = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            wait = backoff_s(attempt, config.max_backoff_s)
            attempt += 1
            logger.warning("webhook %s of job %s, attempt %d: %s; again in %g s", delivery["event"], job_id,
                           attempt, why, wait)
            await asyncio.sleep(wait)
        if outcome != "delivered":
            logger.warning("webhook %s of job %s %s", delivery["event"], job_id, outcome)
        self._done(job_id, delivery["id"], outcome)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        return self._client
