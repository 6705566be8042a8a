"""The engine's front door: sessions by id and owner, capacity, idle expiry, one-shot runs.

Each job has a module of its own, tied together here: the registry of sessions
(session_registry.py; a session is invisible to every other owner, which is what "another key
gets 404" rests on), the slots and each owner's share of them (slots.py: at most
`max_sessions_per_owner` slots, sessions and one-shot kernels together, and
`max_runs_per_owner` one-shot runs at once, so that one key's load never makes another key's
request fail), the idle reaper (reaper.py), one-shot kernels (oneshot.py) and SandboxFusion
notebooks (notebooks.py). The service reaches sessions, and their files, only through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kernelbox_wire.models import Execution

from .backends.base import KernelBackend
from .errors import SessionBusy
from .files import FileLimits
from .history import to_notebook
from .notebooks import NotebookRun, run_notebook
from .oneshot import OneShotKernels, remove_workspace
from .pool import KernelPool, WarmKernel
from .reaper import IdleReaper
from .session import KernelSession, OnEvent, SessionOptions
from .session_registry import ManagedSession, SessionRegistry
from .slots import Slots
from .workspace import Workspace

__all__ = ["ManagedSession", "ManagerOptions", "NotebookRun", "SessionManager"]


@dataclass
class ManagerOptions:
    max_sessions: int = 64
    #: slots (sessions and one-shot kernels) one owner may hold; None: all of them
    max_sessions_per_owner: int | None = None
    #: one-shot runs (execute once, notebooks, stateless runs) one owner may have at once
    max_runs_per_owner: int | None = None
    default_idle_timeout: float = 600.0
    max_idle_timeout: float = 3600.0
    #: seconds unused after which a session pauses by itself (0: never)
    pause_after: float = 0.0
    # How long a create may wait for a free slot before PoolExhausted (0: answer at once).
    acquire_wait: float = 0.0
    reap_interval: float = 1.0
    # Where no filesystem enforces the disk limit: how often idle sessions are measured.
    disk_check_interval: float = 5.0
    session: SessionOptions = field(default_factory=SessionOptions)
    files: FileLimits = field(default_factory=FileLimits)


class SessionManager:
    def __init__(self, pool: KernelPool, options: ManagerOptions | None = None) -> None:
        self.pool = pool
        self.options = opts = options or ManagerOptions()
        self.sessions = SessionRegistry()
        self.slots = Slots(
            opts.max_sessions, opts.max_sessions_per_owner, opts.max_runs_per_owner,
            opts.acquire_wait,
        )  # fmt: skip
        self.reaper = IdleReaper(
            self.sessions,
            self._close,
            interval=opts.reap_interval,
            pause_after=opts.pause_after,
            disk_check_interval=opts.disk_check_interval,
            disks_enforced=pool.workdirs.enforced,
        )
        self.oneshot = OneShotKernels(pool, self.slots, lambda warm: self._session(warm, None))

    @property
    def backend(self) -> KernelBackend:
        return self.pool.backend

    @property
    def reaped_total(self) -> int:
        return self.reaper.reaped_total

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.pool.start()
        self.reaper.start()

    async def close(self) -> None:
        await self.reaper.stop()
        sessions = self.sessions.drain()
        await asyncio.gather(*(self._close(m) for m in sessions), return_exceptions=True)
        await self.pool.close()
        await self.pool.workdirs.close()

    # -- sessions -------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return len(self.sessions)

    async def create(
        self,
        owner: str,
        *,
        idle_timeout: float | None = None,
        env: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ManagedSession:
        """A session from the warm pool; `idle_timeout` is capped at `max_idle_timeout`."""
        await self.slots.take(owner)
        try:
            warm = await self.pool.acquire()
        except BaseException:
            self.slots.give_back(owner)
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
        self.sessions.add(managed)
        if env:
            try:
                await session.run_hidden(f"import os\nos.environ.update({json.dumps(env)})")
            except BaseException:
                await self.delete(session.id, owner)
                raise
        return managed

    def get(self, session_id: str, owner: str) -> ManagedSession:
        return self.sessions.get(session_id, owner)

    def list(self, owner: str) -> list[ManagedSession]:
        return self.sessions.of(owner)

    async def delete(self, session_id: str, owner: str) -> None:
        managed = self.get(session_id, owner)
        self.sessions.pop(session_id)
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
        if self.get(session_id, owner).busy:
            raise SessionBusy(f"session {session_id} is already running code")

    async def interrupt(self, session_id: str, owner: str) -> bool:
        """Interrupt running code (like Ctrl-C); whether any ran."""
        return await self.get(session_id, owner).session.interrupt()

    async def restart(self, session_id: str, owner: str) -> ManagedSession:
        """A fresh kernel in the same working directory: variables are lost, files kept."""
        managed = self.get(session_id, owner)
        await managed.session.restart()
        return managed

    def files(self, session_id: str, owner: str) -> Workspace:
        """The session's working directory, as the service may reach it."""
        return self.get(session_id, owner).session.workspace

    async def pause(self, session_id: str, owner: str) -> ManagedSession:
        """Save the session's variables and stop its kernel; the next execution resumes it."""
        managed = self.get(session_id, owner)
        await managed.session.pause()
        return managed

    async def notebook(self, session_id: str, owner: str) -> str:
        """The session's history as an .ipynb (JSON text); built off the event loop, since a
        history holds up to its byte limit of output to encode and validate."""
        history = self.get(session_id, owner).session.history
        # The cells are taken here, on the loop: the session may add one while the thread works.
        return await asyncio.to_thread(to_notebook, history.cells(), history.dropped)

    # -- one-shot runs ----------------------------------------------------------------------

    def run_slot(self, owner: str) -> contextlib.AbstractAsyncContextManager[None]:
        """One of the owner's one-shot runs (any kind); PoolExhausted past its share."""
        return self.slots.run(owner)

    async def run_once(
        self,
        owner: str,
        code: str,
        timeout: float | None = None,
        on_event: OnEvent | None = None,
    ) -> Execution:
        """Stateless: a fresh warm kernel, used once and discarded."""
        return await self.oneshot.run_once(owner, code, timeout, on_event)

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
        return await run_notebook(
            self.throwaway,
            owner,
            cells,
            total_timeout=total_timeout,
            cell_timeout=cell_timeout,
            files=files,
            fetch=fetch,
        )

    def throwaway(self, owner: str) -> contextlib.AbstractAsyncContextManager[KernelSession]:
        """A session on a fresh warm kernel, for one caller only (see oneshot.py)."""
        return self.oneshot.throwaway(owner)

    # -- internals ------------------------------------------------------------------------

    def _session(self, warm: WarmKernel, env: dict[str, str] | None) -> KernelSession:
        workspace = self.pool.workdirs.workspace(warm.workdir, warm.id, self.options.files)
        workspace.adopt(warm.kernel.proc)
        return KernelSession(
            self.pool.backend,
            warm.kernel,
            workspace,
            options=self.options.session,
            env=env,
            session_id=warm.id,
        )

    async def _close(self, managed: ManagedSession) -> None:
        try:
            await managed.session.close()
        finally:
            try:
                await remove_workspace(managed.session)
            finally:
                self.slots.give_back(managed.owner)
