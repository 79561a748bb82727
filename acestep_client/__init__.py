"""A Python client (and the `acestep` CLI) for the ACE-Step job service.

```python
from acestep_client import Client

with Client("http://localhost:8001") as client:
    job = client.generate(caption="upbeat synth pop", lyrics="[verse]\\nHello", audio_duration=30, batch_size=1)
    job.wait()                     # progress bar: place in line and ETA, then stage and step
    print(job.download("out/"))    # [PosixPath('out/<job_id>-1.mp3')]
```
"""

from acestep_client.async_client import AsyncClient, AsyncJob
from acestep_client.client import Client, Job
from acestep_client.errors import (AceStepError, APIConnectionError, APIError, AuthenticationError, BadRequestError,
                                   ConflictError, InvalidRequestError, JobCanceledError, JobFailedError,
                                   NotFoundError, PayloadTooLargeError, PermissionDeniedError, RateLimitError,
                                   ServerError, UnknownFieldError, UnprocessableEntityError,
                                   WaitTimeoutError)
from acestep_client.progress import ProgressBar
from acestep_client.request import GenerateFields
from acestep_client.retry import RetryPolicy
from jobs.schemas import JobView

__all__ = [
    "Client", "Job", "AsyncClient", "AsyncJob", "GenerateFields", "JobView", "RetryPolicy", "ProgressBar",
    "AceStepError", "InvalidRequestError", "APIConnectionError", "APIError", "BadRequestError", "AuthenticationError",
    "PermissionDeniedError", "NotFoundError", "ConflictError", "PayloadTooLargeError", "UnprocessableEntityError",
    "RateLimitError", "ServerError", "UnknownFieldError", "JobFailedError", "JobCanceledError", "WaitTimeoutError",
]
