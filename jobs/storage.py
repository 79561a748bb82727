"""`ResultStore`: generated audio by key `<job_id>/<index>.<fmt>` under one directory, and nothing else."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote

_KEY = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/[0-9]{1,3}\.(mp3|wav|flac)$")


class ResultStore:
    """A local directory. Keys are validated by shape before any path is built, so no key can leave the root."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(job_id: str, index: int, fmt: str) -> str:
        return f"{job_id}/{index}.{fmt}"

    @staticmethod
    def url(key: str) -> str:
        """The relative download URL upstream L returned: `/v1/audio?path=<quoted key>`."""
        return "/v1/audio?path=" + quote(key, safe="")

    @staticmethod
    def is_key(key: str) -> bool:
        return bool(_KEY.match(key))

    def path(self, key: str) -> Path | None:
        """The file for a well-formed key that exists, else None."""
        if not self.is_key(key):
            return None
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path

    def put(self, key: str, data: bytes) -> None:
        if not self.is_key(key):
            raise ValueError(f"malformed result key {key!r}")
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)
