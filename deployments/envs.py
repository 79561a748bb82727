"""Every environment variable the service reads, in one place (prefix ACESTEP_)."""

from __future__ import annotations

import os

# A local diffusers-format checkpoint directory; when set, it overrides `model.checkpoint_dir` of serve_config.yaml
# (handy for one image that runs on different weights volumes).
ACESTEP_CHECKPOINT_DIR: str | None = os.getenv("ACESTEP_CHECKPOINT_DIR") or None

# Comma-separated SHA-256 hex digests of accepted API keys, added to `auth.api_key_sha256` (keys stay out of configs).
ACESTEP_API_KEY_SHA256: list[str] = [h.strip().lower() for h in os.getenv("ACESTEP_API_KEY_SHA256", "").split(",")
                                     if h.strip()]

# The key that signs webhook deliveries, when `queue.webhooks.secret` is not set (secrets stay out of configs).
ACESTEP_WEBHOOK_SECRET: str | None = os.getenv("ACESTEP_WEBHOOK_SECRET") or None

# Not an environment variable: the digests in force in this process (config + ACESTEP_API_KEY_SHA256), set by the
# ingress constructor and read by its auth middleware.
API_KEY_SHA256: list[str] = []
