"""Every environment variable the client's CLI reads, in one place (prefix ACESTEP_). Read when asked, not at
import, so that a test (or a shell) can set them after the module is loaded."""

from __future__ import annotations

import os


def acestep_server() -> str:
    """ACESTEP_SERVER: the server's base URL, `--server`'s default (http://localhost:8001, as `serve run` binds)."""
    return os.getenv("ACESTEP_SERVER") or "http://localhost:8001"


def acestep_api_key() -> str | None:
    """ACESTEP_API_KEY: the API key sent as `Authorization: Bearer`, `--api-key`'s default (none: an open server)."""
    return os.getenv("ACESTEP_API_KEY") or None
