"""`GET /v1/jobs/{job_id}/events`: a job's view as Server-Sent Events, driven by the registry's long-poll.

One event per change, each the JSON `GET /v1/jobs/{job_id}` answers:

    event: job                 <- `end` for the terminal view; the server closes the stream after it
    data: {"job_id": ..., "status": "running", "queue_position": 0, "progress": {...}, ...}
    id: 3                      <- a counter: 1 on a fresh stream, Last-Event-ID + 1 on a reconnect

    : keep-alive               <- a comment after HEARTBEAT_S without an event, so proxies keep the stream open

A change is what the long-poll waits for (status, place in line, stage, step, attempt: `jobs.registry._change_key`)
or the start estimate moving (`eta_bucket`: by about a fifth), which the registry does not wake on and the stream
sees at the next heartbeat. Each long-poll carries the change key last sent (`since`), so a change that lands
between two calls is answered at once.
Every view comes from the registry, none from the stream's memory: a reconnecting client gets the job's current
view at once, as a new event. Ids are a counter, not a state's name, so they keep rising across reconnects and
`EventSource` resends the latest.

A stream holds one of the ingress' `max_ongoing_requests` (1024) for its whole life, as a long-poll does while it
waits. It stops when the client goes: Serve cancels the request and the registry call it awaits (which then raises
TaskCancelledError here); Starlette's StreamingResponse also cancels its body on `http.disconnect`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import ray
from fastapi import Header
from fastapi.sse import EventSourceResponse, format_sse_event

from jobs.registry import TERMINAL, _change_key

if TYPE_CHECKING:
    from deployments.ingress import FinishedViews
    from jobs.registry import RegistryClient

logger = logging.getLogger(__name__)

HEARTBEAT_S = 15.0  # the registry's long-poll wait, and so the longest silence on a stream
KEEP_ALIVE = format_sse_event(comment="keep-alive")  # b": keep-alive\n\n"
ETA_STEP = 1.2  # an estimate's bucket changes when it moves by about this factor (log1p scale)
MAX_JOB_ID = 64  # longer ids are no job's (as `GET /v1/jobs/{job_id}` says)
# Starlette sets Content-Type; these keep caches and nginx-style proxies from holding events back.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# A default, not an `Annotated` alias: Serve pickles the ingress' methods, and an annotation naming a module-level
# alias no longer resolves in the replica.
LAST_EVENT_ID = Header(None, alias="Last-Event-ID", description=(
    "Sent by a reconnecting client (`EventSource` does it itself): the `id` of the last event it got. The stream "
    "starts with the job's current view all the same, numbered one past it."),
    openapi_examples={"reconnect": {"value": "3"}})

# The 200 answer in OpenAPI, as FastAPI describes its own SSE routes (OpenAPI 3.2's `itemSchema`).
EVENTS_RESPONSE: dict[str, Any] = {
    "description": (
        "A `text/event-stream`: the job's view (as `GET /v1/jobs/{job_id}` answers it) at once and on every change "
        "of status, place in line, stage or step, or when the start estimate moves; `event: job`, or `event: end` "
        "for the final view (succeeded, failed or canceled), after which the server closes the stream. `id` counts "
        "the events (from Last-Event-ID + 1 on a reconnect). A `: keep-alive` comment comes after 15 s without an "
        "event."),
    "content": {"text/event-stream": {"itemSchema": {
        "type": "object", "required": ["event", "data", "id"],
        "properties": {
            "event": {"type": "string", "enum": ["job", "end"]},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": {"$ref": "#/components/schemas/JobView"}},
            "id": {"type": "string", "description": "A counter: 1 on a fresh stream, Last-Event-ID + 1 after it"},
        }}}},
}


def first_event_id(last_event_id: str | None) -> int:
    """1 on a fresh stream, one past the client's Last-Event-ID on a reconnect; a Last-Event-ID that is not one of
    our counters (not a small non-negative integer) starts again at 1."""
    value = (last_event_id or "").strip()
    return int(value) + 1 if value.isascii() and value.isdigit() and len(value) <= 15 else 1


def eta_bucket(eta_seconds: float | None) -> int | None:
    """The start estimate, coarsely: neighbouring buckets differ by a factor of ETA_STEP in `1 + eta`."""
    return None if eta_seconds is None else round(math.log1p(max(eta_seconds, 0.0)) / math.log(ETA_STEP))


def view_json(view: dict[str, Any]) -> bytes:
    """The view as `JSONResponse` renders it, so an event's data is the poll's body byte for byte."""
    return json.dumps(view, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


def encode_event(body: bytes, event_id: int, terminal: bool) -> bytes:
    return format_sse_event(data_str=body.decode(), event="end" if terminal else "job", id=str(event_id))


async def job_events(first: dict[str, Any],
                     next_view: Callable[[float, list], Awaitable[dict[str, Any] | None]],
                     event_id: int, on_end: Callable[[bytes, dict[str, Any]], None] | None = None,
                     heartbeat_s: float = HEARTBEAT_S) -> AsyncIterator[bytes]:
    """`first` as an event, then, from `next_view(heartbeat_s, since)` (the registry's long-poll from the change key
    last sent), each view that changed
    as an event and each that did not as a keep-alive, until the terminal view (`event: end`; `on_end` gets its
    body). Ends without `end` where the registry forgets the job or cannot be reached: the client reconnects and
    learns which (404, or 503 until it is back)."""
    view: dict[str, Any] | None = first
    sent = None
    while view is not None:
        key = (*_change_key(view), eta_bucket(view["eta_seconds"]))
        if key == sent:
            yield KEEP_ALIVE
        else:
            terminal = view["status"] in TERMINAL
            body = view_json(view)
            yield encode_event(body, event_id, terminal)
            if terminal:
                if on_end is not None:
                    on_end(body, view)
                return
            sent, event_id = key, event_id + 1
        try:
            view = await next_view(heartbeat_s, list(sent[:-1]))
        except ray.exceptions.TaskCancelledError:  # the client went: Serve cancelled the request and its registry call
            return
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            logger.warning("event stream of job %s: registry unavailable (%s); closing it", first["job_id"], exc)
            return


async def _once(event: bytes) -> AsyncIterator[bytes]:
    yield event


async def open_job_events(registry: RegistryClient, finished: FinishedViews, job_id: str,
                          last_event_id: str | None) -> EventSourceResponse | None:
    """The route's answer: the job's event stream, or None for a job the registry does not know (the route's
    404). A finished job's stream is its final view alone, from the ingress' cache where it is there."""
    event_id = first_event_id(last_event_id)
    cached = finished.get(job_id)
    if cached is not None:
        return EventSourceResponse(_once(encode_event(cached, event_id, True)), headers=HEADERS)
    view = await registry.call("view", job_id) if len(job_id) <= MAX_JOB_ID else None
    if view is None:
        return None

    async def next_view(wait_s: float, since: list) -> dict[str, Any] | None:
        return await registry.call("view", job_id, wait_s, since)

    def on_end(body: bytes, final: dict[str, Any]) -> None:
        finished.put(job_id, body, final["finished_at"])

    return EventSourceResponse(job_events(view, next_view, event_id, on_end), headers=HEADERS)
