"""The session registry: sessions by id and owner, capacity, idle expiry, one-shot runs.

Ownership is an opaque string (the service derives it from the API key); a session is
invisible to every other owner, which is what "another key gets 404" rests on. Each owner also
has a share: at most `max_sessions_per_owner` slots (sessions and one-shot kernels together)
and `max_runs_per_owner` one-shot runs at once, so that one key's load never makes another
key's request fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kernelbox_wire.models import Execution, Session

from .errors import PoolExhausted, SessionBusy, SessionNotFound
from .files import FileLimits, SessionFiles
from .pool import KernelPool, WarmKernel
from .session import KernelSession, OnEvent, SessionOptions

log = logging.getLogger(__name__)


@dataclass
class ManagerOptions:
    max_sessions: int = 64
    #: slots (sessions and one-shot kernels) one owner may hold; None: all of them
    max_sessions_per_owner: int | None = None
    #: one-shot runs (execute once, notebooks, stateless runs) one owner may have at once
    max_runs_per_owner: int | None = None
    default_idle_timeout: float = 600.0
    max_idle_timeout: float = 3600.0
    # How long a create may wait for a free slot before PoolExhausted (0: answer at once).
    acquire_wait: float = 0.0
    reap_interval: float = 1.0
    # Where no filesystem enforces the disk limit: how often idle sessions are measured.
    disk_check_interval: float = 5.0
    session: SessionOptions = field(default_factory=SessionOptions)
    files: FileLimits = field(default_factory=FileLimits)


@dataclass
class NotebookRun:
    """What `SessionManager.run_notebook` did: the cells that ran, in order."""

    executions: list[Execution] = field(default_factory=list)
    timed_out: bool = False  # the total or a cell's deadline passed
    died: bool = False  # the kernel died in the last cell
    files: dict[str, bytes] = field(default_factory=dict)  # the fetched ones
    notes: list[str] = field(default_factory=list)  # fetched files left out, and why
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
        self._held: Counter[str] = Counter()  # slots per owner
        self._runs: Counter[str] = Counter()  # one-shot runs per owner
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
        await self.pool.workdirs.close()

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
        """A session from the warm pool; `idle_timeout` is capped at `max_idle_timeout`."""
        await self._take_slot(owner)
        try:
            warm = await self.pool.acquire()
        except BaseException:
            self._give_back(owner)
            raise
        session = self._session(warm, env)
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

    def check_idle(self, session_id: str, owner: str) -> None:
        """SessionBusy if the session is running code now (checked before a stream starts)."""
        if self.get(session_id, owner).session.busy:
            raise SessionBusy(f"session {session_id} is already running code")

    async def interrupt(self, session_id: str, owner: str) -> bool:
        """Interrupt running code (like Ctrl-C); whether any ran."""
        return await self.get(session_id, owner).session.interrupt()

    async def restart(self, session_id: str, owner: str) -> ManagedSession:
        """A fresh kernel in the same working directory: variables are lost, files kept."""
        managed = self.get(session_id, owner)
        await managed.session.restart()
        return managed

    def files(self, session_id: str, owner: str) -> SessionFiles:
        return self.get(session_id, owner).session.files

    # -- one-shot runs ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def run_slot(self, owner: str) -> AsyncIterator[None]:
        """One of the owner's one-shot runs (any kind); PoolExhausted past its share."""
        limit = self.options.max_runs_per_owner
        if limit is not None and self._runs[owner] >= limit:
            raise PoolExhausted(
                f"this key already has {limit} one-shot runs under way, its limit",
                retry_after=1,
            )
        self._runs[owner] += 1
        try:
            yield
        finally:
            self._runs[owner] -= 1
            if not self._runs[owner]:
                del self._runs[owner]

    async def run_once(
        self,
        owner: str,
        code: str,
        timeout: float | None = None,
        on_event: OnEvent | None = None,
    ) -> Execution:
        """Stateless: a fresh warm kernel, used once and discarded."""
        async with self.throwaway(owner) as session:
            return await session.execute(code, timeout, on_event)

    async def run_notebook(
        self,
        owner: str,
        cells: list[str],
        *,
        total_timeout: float,
        cell_timeout: float | None = None,
        files: dict[str, bytes] | None = None,
        fetch: Sequence[str] = (),
    ) -> NotebookRun:
        """Run `cells` in order in one fresh kernel, used once and discarded: `files` written
        into its working directory first, `fetch` read back at the end (missing ones left out;
        refused or oversized ones left out with a note).
        The total deadline starts with the kernel, so a cold start is not the cells' time.
        Raises OSError (or UnsafePath) when the files cannot be written."""
        run = NotebookRun()
        started = time.monotonic()
        async with self.throwaway(owner) as session:
            deadline = time.monotonic() + total_timeout
            for path, data in (files or {}).items():
                await session.files.write(path, data)
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
            if fetch:
                run.files, run.notes = await session.files.read_many(list(fetch))
        run.elapsed = time.monotonic() - started
        return run

    @contextlib.asynccontextmanager
    async def throwaway(self, owner: str) -> AsyncIterator[KernelSession]:
        """A session on a fresh warm kernel, for one caller only; discarded (kernel and
        files) on exit, while the pool starts a replacement. Counts as one of the owner's
        one-shot runs and against the slots (its own and max_sessions)."""
        async with self.run_slot(owner):
            await self._take_slot(owner)
            try:
                warm = await self.pool.acquire()
                session = self._session(warm, None)
                try:
                    yield session
                finally:
                    try:
                        await session.close()
                    finally:
                        await self._remove_workdir(session)
            finally:
                self._give_back(owner)

    # -- internals ------------------------------------------------------------------------

    def _session(self, warm: WarmKernel, env: dict[str, str] | None) -> KernelSession:
        files = self.pool.workdirs.files(warm.workdir, warm.id, self.options.files)
        files.owner = warm.kernel.proc.file_owner
        return KernelSession(
            self.pool.backend,
            warm.kernel,
            files,
            options=self.options.session,
            env=env,
            session_id=warm.id,
        )

    async def _take_slot(self, owner: str) -> None:
        limit = self.options.max_sessions_per_owner
        if limit is not None and limit < self.options.max_sessions and self._held[owner] >= limit:
            raise PoolExhausted(
                f"this key holds {limit} sessions and one-shot kernels, its share of the "
                f"service; delete sessions it no longer needs",
                retry_after=5,
            )
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
        self._held[owner] += 1

    def _give_back(self, owner: str) -> None:
        self._held[owner] -= 1
        if self._held[owner] <= 0:
            del self._held[owner]
        self._slots.release()

    async def _close(self, managed: ManagedSession) -> None:
        try:
            await managed.session.close()
        finally:
            try:
                await self._remove_workdir(managed.session)
            finally:
                self._give_back(managed.owner)

    async def _remove_workdir(self, session: KernelSession) -> None:
        try:
            await self.pool.workdirs.remove(session.workdir)
        except Exception:
            # Left for the instance's removal at shutdown (or the next start's, after a crash).
            log.exception("could not remove the working directory of session %s", session.id)

    async def _reap_forever(self) -> None:
        last_disk_check = time.monotonic()
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
            if (
                not self.pool.workdirs.enforced
                and time.monotonic() - last_disk_check >= self.options.disk_check_interval
            ):
                last_disk_check = time.monotonic()
                await self._check_disks()

    async def _check_disks(self) -> None:
        sessions = [m.session for m in self._sessions.values()]
        results = await asyncio.gather(*(s.check_disk() for s in sessions), return_exceptions=True)
        for session, result in zip(sessions, results, strict=True):
            if isinstance(result, Exception):
                log.warning("measuring the disk use of session %s failed: %s", session.id, result)
