"""Every environment variable the service reads, in one place (prefix ACESTEP_)."""

from __future__ import annotations

import os

# A local diffusers-format checkpoint directory; when set, it overrides `model.checkpoint_dir` of serve_config.yaml
# (handy for one image that runs on different weights volumes).
ACESTEP_CHECKPOINT_DIR: str | None = os.getenv("ACESTEP_CHECKPOINT_DIR") or None
