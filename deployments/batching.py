"""Batching knobs every stage reads from its `user_config` (retuned by `serve_config.yaml` without a redeploy)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class BatchingConfig(BaseModel):
    """A stage's `@serve.batch` settings."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(4, ge=1, le=256, description="Requests (jobs) per batch.")
    batch_wait_timeout_s: float = Field(0.05, ge=0.0, le=10.0, description="Wait after the first request of a batch.")


def apply_batching(batched_method: Any, user_config: dict[str, Any] | None) -> BatchingConfig:
    """Validate `user_config` and push it into a `@serve.batch` method."""
    config = BatchingConfig.model_validate(user_config or {})
    batched_method.set_max_batch_size(config.max_batch_size)
    batched_method.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
    return config
