"""The blocking client: `Client.generate(...)` submits a job, `Job` follows it (its event stream, or long-polls
on a server without one), downloads, cancels."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx

try:
    from typing import Unpack
except ImportError:  # pragma: no cover - Python < 3.11
    from typing_extensions import Unpack

from acestep_client.errors import (APIConnectionError, ConflictError, JobCanceledError, JobFailedError,
                                   NotFoundError, WaitTimeoutError, error_from_response)
from acestep_client.event_stream import (EVENTS_ROUTE, JOB_NOT_FOUND, EventStreamDecoder, NoEventStream,
                                         events_timeout, is_event_stream)
from acestep_client.progress import Progress, progress_display
from acestep_client.request import AudioInput, GenerateFields, build_submit
from acestep_client.retry import RETRY_ERRORS, RETRY_STATUSES, RetryPolicy
from jobs.schemas import JobSubmitted, JobView

logger = logging.getLogger(__name__)

DEFAULT_SERVER = "http://localhost:8001"
LONG_POLL_S = 30.0  # the server's longest `?wait=` (jobs/registry.py MAX_WAIT_S); not imported: it pulls in Ray
TERMINAL = ("succeeded", "failed", "canceled")
USER_AGENT = "acestep-client/0.1"


def client_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def job_path(job_id: str) -> str:
    return f"/v1/jobs/{quote(job_id, safe='')}"


def long_poll_timeout(timeout: float, wait_s: float) -> httpx.Timeout:
    """The client's timeout for everything but the read, which also waits out the server's long-poll."""
    return httpx.Timeout(timeout, read=timeout + wait_s)


def remaining_s(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def events_request(job_id: str, last_id: str | None) -> tuple[str, dict[str, str]]:
    """The event stream's URL and headers (Last-Event-ID on a reconnect)."""
    headers = {"Accept": "text/event-stream"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    return job_path(job_id) + EVENTS_ROUTE, headers


def no_event_stream(error: NotFoundError) -> NoEventStream | None:
    """A 404 for the stream itself (an older server: no such route), as opposed to an unknown job."""
    return None if error.detail == JOB_NOT_FOUND else NoEventStream(error.detail)


def final_view(view: JobView) -> JobView:
    """`view` of a succeeded job; a failed or canceled one raises."""
    if view.status == "canceled":
        raise JobCanceledError(view)
    if view.status == "failed":
        raise JobFailedError(view)
    return view


def output_files(view: JobView, directory: str | os.PathLike, name: str | None = None) -> list[tuple[str, Path]]:
    """(result key, file to write) for each output of a succeeded job. Files are `<name>-<n><ext>` (n from 1), or
    `<name><ext>` for a job of one output when `name` is given; `name` defaults to the job id. The extension is the
    server's (`.wav` for wav32), so the name always says what the bytes are."""
    keys = [parse_qs(urlsplit(url).query)["path"][0] for url in (view.result or {}).get("audio_paths", [])]
    stem = name or view.job_id
    files = []
    for index, key in enumerate(keys, 1):
        ext = Path(key).suffix
        filename = f"{stem}{ext}" if name and len(keys) == 1 else f"{stem}-{index}{ext}"
        files.append((key, Path(directory, filename)))
    return files


def write_file(path: Path, data: bytes) -> Path:
    """Written whole or not at all: an interrupted download leaves no truncated file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.part")
    partial.write_bytes(data)
    os.replace(partial, path)
    return path


class Client:
    """The job API of an ACE-Step server, over HTTP.

    ```python
    with Client("http://localhost:8001") as client:
        job = client.generate(caption="upbeat synth pop", audio_duration=30)
        job.wait()                      # a progress bar on stderr
        paths = job.download("out/")    # [out/<job_id>-1.mp3, out/<job_id>-2.mp3]
    ```

    `timeout` bounds each HTTP request (a long-poll's read gets its wait on top, an event stream's the server's 15 s
    keep-alive interval). Network errors and 502/503/504 answers are retried under `retry`; other error answers
    raise an `APIError` subclass at once. `transport` is passed to httpx (tests use it to drop answers)."""

    def __init__(self, base_url: str = DEFAULT_SERVER, api_key: str | None = None, timeout: float = 30.0, *,
                 retry: RetryPolicy = RetryPolicy(), transport: httpx.BaseTransport | None = None):
        self.base_url, self.timeout, self.retry = base_url.rstrip("/"), timeout, retry
        self._http = httpx.Client(base_url=self.base_url, headers=client_headers(api_key), timeout=timeout,
                                  transport=transport)
        self._events = True  # whether the server has job event streams (False once one answered "no such route")

    def generate(self, *, src_audio: AudioInput | None = None, reference_audio: AudioInput | None = None,
                 idempotency_key: str | None = None, **fields: Unpack[GenerateFields]) -> "Job":
        """Submit a job. `fields` are the request's (see `GenerateFields`), checked here first: a bad value raises
        `InvalidRequestError` before anything is sent. `src_audio` / `reference_audio` (a path or the bytes) are
        uploaded. The submit carries an Idempotency-Key (a new uuid4 unless given), the same on every retry, so a
        lost answer never makes a second job."""
        request = build_submit(dict(fields), src_audio, reference_audio)
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        response = self._request("POST", "/v1/music/generate", headers=headers, **request.httpx_kwargs())
        submitted = JobSubmitted.model_validate(response.json())
        logger.info("submitted job %s (queue position %d)", submitted.job_id, submitted.queue_position)
        return Job(self, submitted.job_id)

    def job(self, job_id: str) -> "Job":
        """A job submitted earlier, by id (nothing is sent)."""
        return Job(self, job_id)

    def view(self, job_id: str, wait: float = 0.0) -> JobView:
        """`GET /v1/jobs/{id}`; with `wait` > 0 a long-poll that answers as soon as the job changes."""
        wait = min(max(wait, 0.0), LONG_POLL_S)
        params = {"wait": wait} if wait else None
        response = self._request("GET", job_path(job_id), params=params,
                                 timeout=long_poll_timeout(self.timeout, wait))
        return JobView.model_validate(response.json())

    def cancel(self, job_id: str) -> JobView:
        try:
            return JobView.model_validate(self._request("POST", job_path(job_id) + "/cancel").json())
        except ConflictError:
            view = self.view(job_id)  # a retried cancel whose first try landed finds its own work done
            if view.status == "canceled":
                return view
            raise

    def audio(self, key: str) -> bytes:
        """One result file's bytes (`GET /v1/audio?path=<key>`)."""
        return self._request("GET", "/v1/audio", params={"path": key}).content

    def _follow(self, job_id: str, deadline: float | None = None) -> Iterator[JobView]:
        """The job's views as it changes, until its final view or until `deadline` (a `time.monotonic()` time)
        passes: from its event stream, or by long-polls from a server without one (remembered)."""
        if self._events:
            try:
                yield from self._follow_events(job_id, deadline)
                return
            except NoEventStream as exc:
                logger.info("%s has no job event stream (%s); long-polling", self.base_url, exc)
                self._events = False
        yield from self._follow_polls(job_id, deadline)

    def _follow_polls(self, job_id: str, deadline: float | None) -> Iterator[JobView]:
        view = self.view(job_id)
        while True:
            yield view
            remaining = remaining_s(deadline)
            if view.status in TERMINAL or (remaining is not None and remaining <= 0):
                return
            view = self.view(job_id, wait=LONG_POLL_S if remaining is None else min(remaining, LONG_POLL_S))

    def _follow_events(self, job_id: str, deadline: float | None) -> Iterator[JobView]:
        """`GET /v1/jobs/{id}/events`, reconnecting with Last-Event-ID (and backoff) when it drops or closes before
        its `end` event; the deadline is checked at every event and keep-alive (at most 15 s apart)."""
        last_id, drops = None, 0
        while True:
            url, headers = events_request(job_id, last_id)
            try:
                response = self._request("GET", url, headers=headers, stream=True,
                                         timeout=events_timeout(self.timeout, remaining_s(deadline)))
            except NotFoundError as exc:
                raise no_event_stream(exc) or exc
            try:
                if not is_event_stream(response):
                    raise NoEventStream(f"answered {response.headers.get('content-type')}")
                decoder = EventStreamDecoder(last_id)
                for line in response.iter_lines():
                    if (event := decoder.feed(line)) is not None:
                        last_id, drops = decoder.last_id, 0
                        yield JobView.model_validate_json(event.data)
                        if event.event == "end":
                            return
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                reason = "closed before the job ended"
            except RETRY_ERRORS as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                response.close()
            if drops == self.retry.retries:
                raise APIConnectionError(f"GET {self.base_url}{url}: {reason}")
            delay = self.retry.delay(drops)
            drops += 1
            logger.warning("GET %s: %s; reconnecting in %.1f s", url, reason, delay)
            time.sleep(delay)

    def _request(self, method: str, url: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        """One request, retried on network errors and 502/503/504; an error answer raises its `APIError`. With
        `stream`, the body is left unread (the caller closes the response)."""
        for attempt in range(self.retry.retries + 1):
            last = attempt == self.retry.retries
            try:
                response = self._http.send(self._http.build_request(method, url, **kwargs), stream=stream)
            except RETRY_ERRORS as exc:
                if last:
                    raise APIConnectionError(f"{method} {self.base_url}{url}: {type(exc).__name__}: {exc}") from exc
                delay = self.retry.delay(attempt)
                logger.warning("%s %s: %s; retry in %.1f s", method, url, type(exc).__name__, delay)
                time.sleep(delay)
                continue
            except httpx.TransportError as exc:  # a bad URL or proxy: no retry mends it
                raise APIConnectionError(f"{method} {self.base_url}{url}: {type(exc).__name__}: {exc}") from exc
            if response.status_code in RETRY_STATUSES and not last:
                response.close()
                delay = self.retry.delay(attempt, response)
                logger.warning("%s %s: %d; retry in %.1f s", method, url, response.status_code, delay)
                time.sleep(delay)
                continue
            if response.is_error:
                response.read()  # a streamed answer's body (its `detail`); reading it closes the stream
                raise error_from_response(response)
            return response
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class Job:
    """A job on the server, by id; every method asks the server (the job's state lives there only)."""

    def __init__(self, client: Client, job_id: str):
        self.client, self.id = client, job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobView:
        """The server's view now: status, queue_position, eta_seconds, progress, result, error."""
        return self.client.view(self.id)

    def wait(self, progress: Progress = True, timeout: float | None = None) -> JobView:
        """Follow the job until it ends, by its event stream (`GET /v1/jobs/{id}/events`, one event per change), or
        on a server without one by long-polls that answer on every change; its final view.

        `progress`: True draws a bar on stderr (place in line and ETA while queued, then stage and step), False
        nothing, a callable gets every `JobView` seen. Raises `JobFailedError` / `JobCanceledError` for a job that
        did not succeed, `WaitTimeoutError` after `timeout` seconds (the job goes on; on a stream it is checked at
        every event and keep-alive, so it may come up to 15 s late)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        display = progress_display(progress, self.id)
        views = self.client._follow(self.id, deadline)
        try:
            view = None
            for view in views:
                if display is not None:
                    display(view)
                if view.status in TERMINAL:
                    return final_view(view)
            raise WaitTimeoutError(view or self.status(), timeout)
        finally:
            views.close()
            if display is not None:
                display.close()

    def download(self, directory: str | os.PathLike = ".", *, name: str | None = None) -> list[Path]:
        """Write every output into `directory` (waiting for the job first, without a bar): `<job_id>-1.mp3`, ...
        or, with `name`, `<name>.mp3` for one output and `<name>-1.mp3`, ... for several. The files written."""
        view = self.wait(progress=False)
        return [write_file(path, self.client.audio(key)) for key, path in output_files(view, directory, name)]

    def cancel(self) -> JobView:
        """Cancel the job if it is queued or running; its view after (status "canceled"). A job that already
        finished raises `ConflictError`."""
        return self.client.cancel(self.id)
