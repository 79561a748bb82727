"""What the client raises: one base, the server's HTTP answers by status, and a job that did not succeed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from jobs.schemas import JobView


class AceStepError(Exception):
    """Base of every error this client raises on purpose."""


class InvalidRequestError(AceStepError, ValueError):
    """A request the server would refuse, caught here before anything was sent: `detail` is the server's wording
    (`"inference_steps: Input should be less than or equal to 200 (got 500)"`), `status_code` its answer."""

    def __init__(self, detail: str, status_code: int = 422):
        super().__init__(detail)
        self.detail, self.status_code = detail, status_code


class UnknownFieldError(AceStepError, TypeError):
    """A keyword that is no request field (the server would drop it silently; here it is caught)."""


class APIConnectionError(AceStepError):
    """The server could not be reached (connect error, timeout, 502/503/504 from a proxy) after every retry."""


class APIError(AceStepError):
    """The server answered with an error: `status_code` and its `detail` (the one-line JSON `{"detail"}`)."""

    def __init__(self, status_code: int, detail: str, response: httpx.Response | None = None):
        super().__init__(f"{status_code}: {detail}")
        self.status_code, self.detail, self.response = status_code, detail, response


class BadRequestError(APIError):
    """400: an unknown choice (`audio_format`, `task_type`, `model`), a task the model does not serve, bad audio."""


class AuthenticationError(APIError):
    """401: missing or invalid API key."""


class PermissionDeniedError(APIError):
    """403: a `*_path` outside the server's allowed input directories, or a path that is not one of its results."""


class NotFoundError(APIError):
    """404: unknown job (or one past the server's retention), or a missing audio file."""


class ConflictError(APIError):
    """409: the job already finished (cancel), or an Idempotency-Key reused with another request."""


class PayloadTooLargeError(APIError):
    """413: an upload or body over the server's limits."""


class UnprocessableEntityError(APIError):
    """422: a wrong type or an out-of-range value, or beyond this server's limits (duration, outputs)."""


class RateLimitError(APIError):
    """429: the server's queue is full; no job was made. `retry_after` is the server's hint in seconds."""

    @property
    def retry_after(self) -> float | None:
        value = self.response.headers.get("retry-after") if self.response is not None else None
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None


class ServerError(APIError):
    """5xx other than the proxy's retried 502/503/504 (or those, once retries ran out with an answer)."""


_BY_STATUS: dict[int, type[APIError]] = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
                                         404: NotFoundError, 409: ConflictError, 413: PayloadTooLargeError,
                                         422: UnprocessableEntityError, 429: RateLimitError}


def error_from_response(response: httpx.Response) -> APIError:
    """The `APIError` subclass for an error answer, carrying the server's `detail` (or the start of a proxy's
    non-JSON body)."""
    try:
        body = response.json()
        detail = body["detail"] if isinstance(body, dict) and "detail" in body else response.text
    except ValueError:
        detail = response.text.strip()[:300] or response.reason_phrase
    if not isinstance(detail, str):  # a framework's list of errors, should one get through
        detail = str(detail)
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    return cls(status, detail, response)


class JobFailedError(AceStepError):
    """The job ended without audio: `view` is its final `JobView`, `view.error` the server's one-line reason."""

    def __init__(self, view: "JobView"):
        super().__init__(f"job {view.job_id} {view.status}: {view.error or 'no reason given'}")
        self.view = view


class JobCanceledError(JobFailedError):
    """The job was canceled (by this client or another)."""


class WaitTimeoutError(AceStepError, TimeoutError):
    """`wait(timeout=...)` ran out; the job goes on on the server. `view` is the last one seen."""

    def __init__(self, view: "JobView", timeout: float):
        super().__init__(f"job {view.job_id} still {view.status} after {timeout:g} s; it keeps running on the server")
        self.view = view
