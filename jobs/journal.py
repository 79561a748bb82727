"""The registry's journal: every job record, written to SQLite before the registry answers.

One row per job (its latest state as JSON), in a table per registry name so that apps can share a file. On start
the registry reads every row back, so a restarted actor, or a whole app (or cluster) started again on the same disk,
loses no job.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any


class Journal:
    def __init__(self, path: str | Path, name: str):
        if not re.fullmatch(r"[A-Za-z0-9_]+", name.replace("-", "_")):
            raise ValueError(f"bad registry name {name!r}")
        self.table = "jobs_" + name.replace("-", "_")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # The default rollback journal, not WAL: WAL needs shared memory that network volumes (a Kubernetes RWX
        # claim) do not give. Each save is its own committed transaction before the registry answers.
        self._db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (job_id TEXT PRIMARY KEY, record TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS registry_config (name TEXT PRIMARY KEY, config TEXT NOT NULL)")
        self.name = name

    def save(self, job_id: str, record: dict[str, Any] | str) -> None:
        """One job's record: a dict, or its JSON already serialized (the registry serializes on its event loop, so
        the record cannot change under a writer thread)."""
        text = record if isinstance(record, str) else json.dumps(record)
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO {self.table} (job_id, record) VALUES (?, ?)", (job_id, text))

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute(f"DELETE FROM {self.table} WHERE job_id = ?", (job_id,))

    def load(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(row[0]) for row in self._db.execute(f"SELECT record FROM {self.table}")]

    def save_config(self, config: dict[str, Any]) -> None:
        """The latest deploy's registry config, which a restarted actor (created with older arguments) reads back."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO registry_config (name, config) VALUES (?, ?)",
                             (self.name, json.dumps(config)))

    def load_config(self) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT config FROM registry_config WHERE name = ?", (self.name,)).fetchone()
        return json.loads(row[0]) if row else None

    def close(self) -> None:
        with self._lock:
            self._db.close()
