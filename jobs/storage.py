"""`ResultStore`: generated audio by key `<job_id>/<index>.<extension>` under one root, and nothing else; `UploadStore`:
uploaded input audio by key `<job_id>/<field>`, the same way.

The root is a local directory or an fsspec URL (`s3://bucket/prefix`, `gs://...`), so that an ingress replica on any
node can serve what a codec replica on any node wrote, and a driver on any node can read what an ingress stored.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import fsspec
from fsspec.implementations.local import LocalFileSystem

_CHUNK = 1024 * 1024
_KEY = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/[0-9]{1,3}"
                  r"\.(mp3|wav|flac|opus|aac)$")  # the extensions of models.audio_io.FORMATS


class ResultStore:
    """Keys are validated by shape before any path is built, so no key can name anything outside the root."""

    KEY = _KEY

    def __init__(self, root: str | Path, storage_options: dict[str, Any] | None = None):
        self.fs, path = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            path = str(Path(path).resolve())
        self.root = path.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)

    @staticmethod
    def key(job_id: str, index: int, extension: str) -> str:
        return f"{job_id}/{index}.{extension}"

    @staticmethod
    def url(key: str) -> str:
        """The relative download URL upstream L returned: `/v1/audio?path=<quoted key>`."""
        return "/v1/audio?path=" + quote(key, safe="")

    @classmethod
    def is_key(cls, key: str) -> bool:
        return bool(cls.KEY.match(key))

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

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        """Store bytes, or copy a file object in chunks (an upload is never held in memory whole)."""
        if not self.is_key(key):
            raise ValueError(f"malformed key {key!r}")
        target = f"{self.root}/{key}"
        if not self.is_local:
            if isinstance(data, bytes):
                self.fs.pipe_file(target, data)  # an object store PUT is atomic
            else:
                with self.fs.open(target, "wb") as handle:  # a multipart upload, committed on close
                    shutil.copyfileobj(data, handle, _CHUNK)
            return
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=Path(target).parent, prefix=".part-")  # write, then rename: no torn reads
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                shutil.copyfileobj(data, handle, _CHUNK)
        os.replace(tmp, target)

    def delete_job(self, job_id: str) -> None:
        try:
            self.fs.rm(f"{self.root}/{job_id}", recursive=True)
        except FileNotFoundError:
            pass


class UploadStore(ResultStore):
    """Uploaded input audio, `<job_id>/<field>`, kept only while its job lives (the registry deletes it)."""

    KEY = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/(src_audio|reference_audio)$")

    @staticmethod
    def key(job_id: str, field: str) -> str:  # type: ignore[override]
        return f"{job_id}/{field}"
