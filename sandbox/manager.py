"""The session registry: sessions by id and owner, capacity, idle expiry, one-shot runs.

Ownership is an opaque string (the service derives it from the API key); a session is
invisible to every other owner, which is what "another key gets 404" rests on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kernelbox.models import Execution, Session

from . import files as sandbox_files
from .errors import PoolExhausted, SessionNotFound
from .pool import KernelPool
from .session import KernelSession, OnEvent, SessionOptions

log = logging.getLogger(__name__)


@dataclass
class ManagerOptions:
    max_sessions: int = 64
    default_idle_timeout: float = 600.0
    max_idle_timeout: float = 24 * 3600.0
    # How long a create may wait for a free slot before PoolExhausted (0: answer at once).
    acquire_wait: float = 0.0
    reap_interval: float = 1.0
    session: SessionOptions = field(default_factory=SessionOptions)


@dataclass
class NotebookRun:
    """What `SessionManager.run_notebook` did: the cells that ran, in order."""

    executions: list[Execution] = field(default_factory=list)
    timed_out: bool = False  # the total or a cell's deadline passed
    died: bool = False  # the kernel died in the last cell
    files: dict[str, bytes] = field(default_factory=dict)  # the fetched ones
    elapsed: float = 0.0  # seconds, kernel acquisition included


@dataclass
class ManagedSession:
    session: KernelSession
    owner: str
    idle_timeout: float
    metadata: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def expires_at(self) -> float:
        return self.last_used_at + self.idle_timeout

    def to_model(self) -> Session:
        return Session(
            id=self.id,
            status=self.session.status,  # type: ignore[arg-type]
            created_at=_dt(self.created_at),
            last_used_at=_dt(self.last_used_at),
            expires_at=_dt(self.expires_at),
            execution_count=self.session.execution_count,
            metadata=self.metadata,
        )


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


class SessionManager:
    def __init__(self, pool: KernelPool, options: ManagerOptions | None = None) -> None:
        self.pool = pool
        self.options = options or ManagerOptions()
        self._sessions: dict[str, ManagedSession] = {}
        self._slots = asyncio.Semaphore(self.options.max_sessions)
        self._reaper: asyncio.Task[None] | None = None
        self.reaped_total = 0

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.pool.start()
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(self._close(m) for m in sessions), return_exceptions=True)
        await self.pool.close()

    # -- sessions -------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return len(self._sessions)

    async def create(
        self,
        owner: str,
        *,
        idle_timeout: float | None = None,
        env: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ManagedSession:
        await self._take_slot()
        try:
            warm = await self.pool.acquire()
        except BaseException:
            self._slots.release()
            raise
        session = KernelSession(
            self.pool.backend,
            warm.kernel,
            warm.workdir,
            options=self.options.session,
            env=env,
            session_id=warm.id,
        )
        managed = ManagedSession(
            session=session,
            owner=owner,
            idle_timeout=min(
                idle_timeout or self.options.default_idle_timeout, self.options.max_idle_timeout
            ),
            metadata=metadata or {},
        )
        self._sessions[session.id] = managed
        if env:
            try:
                await session.run_hidden(f"import os\nos.environ.update({json.dumps(env)})")
            except BaseException:
                await self.delete(session.id, owner)
                raise
        return managed

    def get(self, session_id: str, owner: str) -> ManagedSession:
        managed = self._sessions.get(session_id)
        if managed is None or managed.owner != owner:
            raise SessionNotFound(f"no session {session_id!r}")
        return managed

    def list(self, owner: str) -> list[ManagedSession]:
        return [m for m in self._sessions.values() if m.owner == owner]

    async def delete(self, session_id: str, owner: str) -> None:
        managed = self.get(session_id, owner)
        self._sessions.pop(session_id, None)
        await self._close(managed)

    async def execute(
        self,
        session_id: str,
        owner: str,
        code: str,
        timeout: float | None = None,
        on_event: OnEvent | None = None,
    ) -> Execution:
        managed = self.get(session_id, owner)
        managed.last_used_at = time.time()
        try:
            return await managed.session.execute(code, timeout, on_event)
        finally:
            managed.last_used_at = time.time()

    async def run_once(
        self, code: str, timeout: float | None = None, on_event: OnEvent | None = None
    ) -> Execution:
        """Stateless: a fresh warm kernel, used once and discarded."""
        async with self.throwaway() as session:
            return await session.execute(code, timeout, on_event)

    async def run_notebook(
        self,
        cells: list[str],
        *,
        total_timeout: float,
        cell_timeout: float | None = None,
        files: dict[str, bytes] | None = None,
        fetch: Sequence[str] = (),
    ) -> NotebookRun:
        """Run `cells` in order in one fresh kernel, used once and discarded: `files` written
        into its working directory first, `fetch` read back at the end (missing ones left out).
        The total deadline starts with the kernel, so a cold start is not the cells' time.
        Raises OSError (or UnsafePath) when the files cannot be written."""
        run = NotebookRun()
        started = time.monotonic()
        async with self.throwaway() as session:
            deadline = time.monotonic() + total_timeout
            owner = session.kernel.proc.file_owner  # the kernel may replace what it was given
            for path, data in (files or {}).items():
                sandbox_files.write_file(session.workdir, path, data, owner=owner)
            for cell in cells:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    run.timed_out = True
                    break
                timeout = min(remaining, cell_timeout) if cell_timeout else remaining
                execution = await session.execute(cell, timeout)
                run.executions.append(execution)
                if execution.status in ("timeout", "died"):
                    # The kernel was interrupted or lost its state: later cells would run
                    # against something else than the notebook meant.
                    run.timed_out = execution.status == "timeout"
                    run.died = execution.status == "died"
                    break
            for path in fetch:
                with contextlib.suppress(OSError, sandbox_files.UnsafePath):
                    run.files[path] = sandbox_files.read_file(session.workdir, path)
        run.elapsed = time.monotonic() - started
        return run

    @contextlib.asynccontextmanager
    async def throwaway(self) -> AsyncIterator[KernelSession]:
        """A session on a fresh warm kernel, for one caller only; discarded (kernel and
        files) on exit, while the pool starts a replacement. Counts against max_sessions."""
        await self._take_slot()
        try:
            warm = await self.pool.acquire()
            session = KernelSession(
                self.pool.backend, warm.kernel, warm.workdir, options=self.options.session
            )
            try:
                yield session
            finally:
                await session.close()
                shutil.rmtree(warm.workdir.parent, ignore_errors=True)
        finally:
            self._slots.release()

    # -- internals ------------------------------------------------------------------------

    async def _take_slot(self) -> None:
        wait = self.options.acquire_wait
        if wait <= 0 and self._slots.locked():
            raise PoolExhausted(
                f"all {self.options.max_sessions} session slots are in use", retry_after=1
            )
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=max(wait, 0.001))
        except TimeoutError:
            raise PoolExhausted(
                f"all {self.options.max_sessions} session slots stayed in use for {wait:g} s",
                retry_after=max(1, round(wait)),
            ) from None

    async def _close(self, managed: ManagedSession) -> None:
        try:
            await managed.session.close()
        finally:
            shutil.rmtree(managed.session.workdir.parent, ignore_errors=True)
            self._slots.release()

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.reap_interval)
            now = time.time()
            expired = [
                m for m in self._sessions.values() if m.expires_at <= now and not m.session.busy
            ]
            for managed in expired:
                if self._sessions.pop(managed.id, None) is not None:
                    log.info(
                        "session %s expired after %.0f s idle", managed.id, managed.idle_timeout
                    )
                    self.reaped_total += 1
                    try:
                        await self._close(managed)
                    except Exception:
                        log.exception("closing expired session %s failed", managed.id)
