"""The session registry's copy on disk: one SQLite file in the data directory.

The in-memory registry (session_registry.py) is the truth while the service runs; this file
mirrors it, written on every change of a session's state, so that a service started again on
the same data directory finds its sessions (who owns them, their options and metadata, their
execution counts, their working directories, and where their kernels run) and re-attaches to
them (manager.py: `SessionManager.restore`).

Stdlib sqlite3, no server: each call runs on one thread of its own (off the event loop, and in
the order the calls were made, so a later state never loses to an earlier one). The file is
the service's only (0600): it holds each kernel's connection key and each session's
environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .backends.kept import DB_NAME, SCHEMA

__all__ = ["DB_NAME", "SessionRecord", "SessionStore"]


@dataclass
class SessionRecord:
    """What a session is, as far as outliving the service goes."""

    id: str
    owner: str
    idle_timeout: float
    created_at: float
    last_used_at: float
    metadata: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    execution_count: int = 0
    #: the working directory, relative to the data directory
    workdir: str = ""
    #: the running kernel's description (KernelProcess.describe), None when none runs
    kernel: dict[str, Any] | None = None
    #: paused: the saved names and those that could not be saved (with why)
    paused: dict[str, Any] | None = None

    @property
    def container_id(self) -> str | None:
        return (self.kernel or {}).get("container_id")


class SessionStore:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / DB_NAME
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kernelbox-store")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> list[SessionRecord]:
        """Open (or create) the file; the sessions it holds."""
        return await self._run(self._open)

    async def put(self, record: SessionRecord) -> None:
        await self._run(self._put, record)

    async def delete(self, session_id: str) -> None:
        await self._run(self._delete, session_id)

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- on the store's thread ----------------------------------------------------------------

    def _open(self) -> list[SessionRecord]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        os.close(fd)  # made 0600 before sqlite writes a byte of it
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # WAL: a reader (the orphan reaper's process) never blocks a write, and a crash
        # mid-write loses at most that write.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(SCHEMA)
        self._db = db
        rows = db.execute("SELECT record FROM sessions").fetchall()
        return [SessionRecord(**json.loads(row[0])) for row in rows]

    def _put(self, record: SessionRecord) -> None:
        assert self._db is not None
        self._db.execute(
            "INSERT OR REPLACE INTO sessions (id, container_id, record) VALUES (?, ?, ?)",
            (record.id, record.container_id, json.dumps(asdict(record))),
        )

    def _delete(self, session_id: str) -> None:
        assert self._db is not None
        self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
