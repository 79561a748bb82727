"""What every stage shim shares: batching knobs from `user_config`, and a health record of its engine."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)


class BatchingConfig(BaseModel):
    """A stage's `@serve.batch` settings (retuned by `serve_config.yaml` without a redeploy)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(4, ge=1, le=256, description="Requests (jobs) per batch.")
    batch_wait_timeout_s: float = Field(0.05, ge=0.0, le=10.0, description="Wait after the first request of a batch.")


def apply_batching(batched_method: Any, user_config: dict[str, Any] | None) -> BatchingConfig:
    """Validate `user_config` and push it into a `@serve.batch` method."""
    config = BatchingConfig.model_validate(user_config or {})
    batched_method.set_max_batch_size(config.max_batch_size)
    batched_method.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
    return config


class EngineGuard:
    """Runs engine calls in a worker thread and counts consecutive failures.

    One failing batch fails only its own jobs. `max_consecutive_failures` in a row mean the engine itself is broken
    (a lost CUDA context, say): `check_health` then raises and Serve replaces the replica.
    """

    def __init__(self, stage: str, max_consecutive_failures: int = 3):
        self.stage, self.limit, self.failures = stage, max_consecutive_failures, 0

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            result = await asyncio.to_thread(fn, *args)
        except Exception:
            self.failures += 1
            logger.exception("%s engine call failed (%d in a row)", self.stage, self.failures)
            raise
        self.failures = 0
        return result

    def check_health(self) -> None:
        if self.failures >= self.limit:
            raise RuntimeError(f"{self.stage} engine failed {self.failures} calls in a row")


class StageReplica:
    """What the three stage deployments share: load the engine, warm it up, report health and readiness.

    A subclass sets `engine_class` and `stage`, calls `await self.start(model)` from its constructor, and adds its
    `@serve.batch` method and `reconfigure`.
    """

    engine_class: type
    stage: str

    async def start(self, model: Any) -> None:
        self.engine = await asyncio.to_thread(self.engine_class, model)
        self.guard = EngineGuard(self.stage)
        await asyncio.to_thread(self.engine.warm_up)  # before Serve routes anything here

    def check_health(self) -> None:
        self.guard.check_health()

    async def ready(self) -> bool:
        """Constructed means loaded and warmed up (Serve routes nothing to a replica before that)."""
        return True
