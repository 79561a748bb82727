"""The asyncio twin of `Client` and `Job`: the same methods, awaited."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

try:
    from typing import Unpack
except ImportError:  # pragma: no cover - Python < 3.11
    from typing_extensions import Unpack

from acestep_client.client import (DEFAULT_SERVER, LONG_POLL_S, TERMINAL, client_headers, events_request,
                                   final_view, job_path, long_poll_timeout, no_event_stream, output_files,
                                   remaining_s, write_file)
from acestep_client.errors import (APIConnectionError, ConflictError, NotFoundError, WaitTimeoutError,
                                   error_from_response)
from acestep_client.event_stream import EventStreamDecoder, NoEventStream, events_timeout, is_event_stream
from acestep_client.progress import Progress, progress_display
from acestep_client.request import AudioInput, GenerateFields, build_submit
from acestep_client.retry import RETRY_ERRORS, RETRY_STATUSES, RetryPolicy
from jobs.schemas import JobSubmitted, JobView

logger = logging.getLogger(__name__)


class AsyncClient:
    """`Client` for asyncio: `job = await client.generate(...)`, `await job.wait()`, `await job.download(dir)`."""

    def __init__(self, base_url: str = DEFAULT_SERVER, api_key: str | None = None, timeout: float = 30.0, *,
                 retry: RetryPolicy = RetryPolicy(), transport: httpx.AsyncBaseTransport | None = None):
        self.base_url, self.timeout, self.retry = base_url.rstrip("/"), timeout, retry
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=client_headers(api_key), timeout=timeout,
                                       transport=transport)
        self._events = True  # whether the server has job event streams (False once one answered "no such route")

    async def generate(self, *, src_audio: AudioInput | None = None, reference_audio: AudioInput | None = None,
                       idempotency_key: str | None = None, **fields: Unpack[GenerateFields]) -> "AsyncJob":
        """`Client.generate`: checked here first, uploads read once, one Idempotency-Key for every retry."""
        request = await asyncio.to_thread(build_submit, dict(fields), src_audio, reference_audio)
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        response = await self._request("POST", "/v1/music/generate", headers=headers, **request.httpx_kwargs())
        submitted = JobSubmitted.model_validate(response.json())
        logger.info("submitted job %s (queue position %d)", submitted.job_id, submitted.queue_position)
        return AsyncJob(self, submitted.job_id)

    def job(self, job_id: str) -> "AsyncJob":
        return AsyncJob(self, job_id)

    async def view(self, job_id: str, wait: float = 0.0) -> JobView:
        wait = min(max(wait, 0.0), LONG_POLL_S)
        params = {"wait": wait} if wait else None
        response = await self._request("GET", job_path(job_id), params=params,
                                       timeout=long_poll_timeout(self.timeout, wait))
        return JobView.model_validate(response.json())

    async def cancel(self, job_id: str) -> JobView:
        try:
            return JobView.model_validate((await self._request("POST", job_path(job_id) + "/cancel")).json())
        except ConflictError:
            view = await self.view(job_id)
            if view.status == "canceled":
                return view
            raise

    async def audio(self, key: str) -> bytes:
        return (await self._request("GET", "/v1/audio", params={"path": key})).content

    async def _follow(self, job_id: str, deadline: float | None = None) -> AsyncIterator[JobView]:
        """`Client._follow`: the job's views from its event stream, or by long-polls from a server without one."""
        if self._events:
            try:
                async for view in self._follow_events(job_id, deadline):
                    yield view
                return
            except NoEventStream as exc:
                logger.info("%s has no job event stream (%s); long-polling", self.base_url, exc)
                self._events = False
        view = await self.view(job_id)
        while True:
            yield view
            remaining = remaining_s(deadline)
            if view.status in TERMINAL or (remaining is not None and remaining <= 0):
                return
            view = await self.view(job_id, wait=LONG_POLL_S if remaining is None else min(remaining, LONG_POLL_S))

    async def _follow_events(self, job_id: str, deadline: float | None) -> AsyncIterator[JobView]:
        """`Client._follow_events`: reconnects with Last-Event-ID when the stream drops before its `end` event."""
        last_id, drops = None, 0
        while True:
            url, headers = events_request(job_id, last_id)
            try:
                response = await self._request("GET", url, headers=headers, stream=True,
                                               timeout=events_timeout(self.timeout, remaining_s(deadline)))
            except NotFoundError as exc:
                raise no_event_stream(exc) or exc
            try:
                if not is_event_stream(response):
                    raise NoEventStream(f"answered {response.headers.get('content-type')}")
                decoder = EventStreamDecoder(last_id)
                async for line in response.aiter_lines():
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
                await response.aclose()
            if drops == self.retry.retries:
                raise APIConnectionError(f"GET {self.base_url}{url}: {reason}")
            delay = self.retry.delay(drops)
            drops += 1
            logger.warning("GET %s: %s; reconnecting in %.1f s", url, reason, delay)
            await asyncio.sleep(delay)

    async def _request(self, method: str, url: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retry.retries + 1):
            last = attempt == self.retry.retries
            try:
                response = await self._http.send(self._http.build_request(method, url, **kwargs), stream=stream)
            except RETRY_ERRORS as exc:
                if last:
                    raise APIConnectionError(f"{method} {self.base_url}{url}: {type(exc).__name__}: {exc}") from exc
                delay = self.retry.delay(attempt)
                logger.warning("%s %s: %s; retry in %.1f s", method, url, type(exc).__name__, delay)
                await asyncio.sleep(delay)
                continue
            except httpx.TransportError as exc:  # a bad URL or proxy: no retry mends it
                raise APIConnectionError(f"{method} {self.base_url}{url}: {type(exc).__name__}: {exc}") from exc
            if response.status_code in RETRY_STATUSES and not last:
                await response.aclose()
                delay = self.retry.delay(attempt, response)
                logger.warning("%s %s: %d; retry in %.1f s", method, url, response.status_code, delay)
                await asyncio.sleep(delay)
                continue
            if response.is_error:
                await response.aread()  # a streamed answer's body (its `detail`); reading it closes the stream
                raise error_from_response(response)
            return response
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()


class AsyncJob:
    """`Job` for asyncio."""

    def __init__(self, client: AsyncClient, job_id: str):
        self.client, self.id = client, job_id

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    async def status(self) -> JobView:
        return await self.client.view(self.id)

    async def wait(self, progress: Progress = True, timeout: float | None = None) -> JobView:
        """`Job.wait`: follows the job's event stream (long-polls on a server without one) until it ends; raises
        for a failed or canceled job, or after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        display = progress_display(progress, self.id)
        views = self.client._follow(self.id, deadline)
        try:
            view = None
            async for view in views:
                if display is not None:
                    display(view)
                if view.status in TERMINAL:
                    return final_view(view)
            raise WaitTimeoutError(view or await self.status(), timeout)
        finally:
            await views.aclose()
            if display is not None:
                display.close()

    async def download(self, directory: str | os.PathLike = ".", *, name: str | None = None) -> list[Path]:
        """`Job.download`: waits for the job (no bar), then writes every output; the files written."""
        view = await self.wait(progress=False)
        paths = []
        for key, path in output_files(view, directory, name):
            data = await self.client.audio(key)
            paths.append(await asyncio.to_thread(write_file, path, data))
        return paths

    async def cancel(self) -> JobView:
        return await self.client.cancel(self.id)
