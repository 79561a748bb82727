"""`ResultStore`: generated audio by key `<job_id>/<index>.<fmt>` under one root, and nothing else.

The root is a local directory or an fsspec URL (`s3://bucket/prefix`, `gs://...`), so that an ingress replica on any
node can serve what a driver on any node wrote.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import fsspec
from fsspec.implementations.local import LocalFileSystem

_KEY = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/[0-9]{1,3}\.(mp3|wav|flac)$")


class ResultStore:
    """Keys are validated by shape before any path is built, so no key can name anything outside the root."""

    def __init__(self, root: str | Path, storage_options: dict[str, Any] | None = None):
        self.fs, path = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            path = str(Path(path).resolve())
        self.root = path.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)

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

    def local_path(self, key: str) -> Path | None:
        """For a local root: the file of a well-formed key that exists, else None."""
        if not (self.is_local and self.is_key(key)):
            return None
        path = Path(self.root, key).resolve()
        return path if path.is_relative_to(self.root) and path.is_file() else None

    def get(self, key: str) -> bytes | None:
        if not self.is_key(key):
            return None
        try:
            return self.fs.cat_file(f"{self.root}/{key}")
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        if not self.is_key(key):
            raise ValueError(f"malformed result key {key!r}")
        target = f"{self.root}/{key}"
        if not self.is_local:
            self.fs.pipe_file(target, data)  # an object store PUT is atomic
            return
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=Path(target).parent, prefix=".part-")  # write, then rename: no torn reads
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)

    def delete_job(self, job_id: str) -> None:
        try:
            self.fs.rm(f"{self.root}/{job_id}", recursive=True)
        except FileNotFoundError:
            pass
