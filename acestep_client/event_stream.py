"""Reading `text/event-stream` (Server-Sent Events) line by line, as the WHATWG spec's parser does, for
`GET /v1/jobs/{id}/events`. httpx's `iter_lines` / `aiter_lines` already split on CR, LF and CRLF."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

EVENTS_ROUTE = "/events"  # under the job's path: GET /v1/jobs/{id}/events
JOB_NOT_FOUND = "Job not found"  # the server's 404 detail for an unknown job; any other 404 means no such route
KEEP_ALIVE_S = 15.0  # the server's longest silence on a stream (deployments/events.py HEARTBEAT_S)


@dataclass(frozen=True)
class ServerEvent:
    event: str  # "message" when the server named none
    data: str
    id: str | None  # the last id the stream set, as `EventSource.lastEventId`


class EventStreamDecoder:
    """Feed it a stream's lines; it answers each event once the blank line that ends it arrives, else None."""

    def __init__(self, last_id: str | None = None) -> None:
        self.last_id = last_id  # carried over to a reconnect's decoder, and sent as Last-Event-ID
        self._event, self._data = "", []

    def feed(self, line: str) -> ServerEvent | None:
        if not line:
            event, data = self._event or "message", self._data
            self._event, self._data = "", []
            return ServerEvent(event, "\n".join(data), self.last_id) if data else None
        if line.startswith(":"):  # a comment: the server's keep-alive
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        elif field == "id" and "\0" not in value:
            self.last_id = value
        return None  # `retry` and unknown fields: ignored


def is_event_stream(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").partition(";")[0].strip() == "text/event-stream"


def events_timeout(timeout: float, remaining: float | None) -> httpx.Timeout:
    """`timeout` for connecting and writing; a read waits out the server's keep-alive interval on top, but not past
    a wait's `remaining` seconds."""
    read = timeout + KEEP_ALIVE_S
    if remaining is not None:
        read = min(read, max(remaining, 0.05))
    return httpx.Timeout(timeout, read=read)


class NoEventStream(Exception):
    """The server has no event stream (an older one: its 404 is not "Job not found"); long-poll instead."""
