"""When a request is sent again: the network failed, or a proxy answered 502/503/504 (the app restarting, a
registry momentarily away). Submits carry an Idempotency-Key, so a retry never makes a second job."""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx

RETRY_STATUSES = frozenset({502, 503, 504})
# Connect, read and write failures, timeouts, and a server that closed the connection before answering; not
# UnsupportedProtocol or a bad proxy URL, which no retry mends.
RETRY_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` more tries after the first, waiting `backoff_s * 2**n` (with jitter, at most `max_backoff_s`, or the
    server's Retry-After where it gives one) before try `n + 1`."""

    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0 for the first retry)."""
        hint = response.headers.get("retry-after") if response is not None else None
        if hint is not None:
            try:
                return min(max(float(hint), 0.0), self.max_backoff_s)
            except ValueError:
                pass  # an HTTP date: back off as usual
        return min(self.backoff_s * 2**attempt, self.max_backoff_s) * random.uniform(0.5, 1.0)


NO_RETRY = RetryPolicy(retries=0)
