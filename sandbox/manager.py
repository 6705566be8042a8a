"""The engine's front door: sessions by id and owner, capacity, idle expiry, one-shot runs.

Each job has a module of its own, tied together here: the registry of sessions
(session_registry.py; a session is invisible to every other owner, which is what "another key
gets 404" rests on), the slots and each owner's share of them (slots.py: at most
`max_sessions_per_owner` slots, sessions and one-shot kernels together, and
`max_runs_per_owner` one-shot runs at once, so that one key's load never makes another key's
request fail), the idle reaper (reaper.py), one-shot kernels (oneshot.py) and SandboxFusion
notebooks (notebooks.py). The service reaches sessions, and their files, only through here.

With a session store (store.py) every session's record is written there on each change of its
state, and a service started again on the same data directory restores them (`restore`):
kernels that still run (Docker's containers) are re-attached and checked to answer, with
their variables; the others come back as sessions with their files whose next execution
reports `kernel_restarted` (a fresh kernel). A graceful shutdown leaves kernels running where
the backend can (`stop_kernels_on_shutdown`: not even there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kernelbox_wire.models import Execution

from .backends.base import CannotAttach, KernelBackend
from .errors import KernelStartError, PoolExhausted, SessionBusy
from .files import FileLimits
from .history import to_notebook
from .kernel import Kernel
from .namespace import Report
from .notebooks import NotebookRun, run_notebook
from .oneshot import OneShotKernels, remove_workspace
from .pool import KernelPool, WarmKernel
from .reaper import IdleReaper
from .session import STATE_LOST, KernelSession, OnEvent, SessionOptions
from .session_registry import ManagedSession, SessionRegistry
from .slots import Slots
from .store import SessionRecord, SessionStore
from .workspace import Workspace

__all__ = ["ManagedSession", "ManagerOptions", "NotebookRun", "SessionManager"]

log = logging.getLogger(__name__)

RESTORED_WITHOUT_KERNEL = (
    "The service was restarted and this session's kernel did not survive it ({why}). {lost}"
)


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
    #: a graceful shutdown stops the kernels too (else it leaves them running where the
    #: backend can, for the next service to re-attach to); sessions are kept either way
    stop_kernels_on_shutdown: bool = False
    #: how long a kernel found again at start-up may take to answer
    attach_timeout: float = 10.0
    session: SessionOptions = field(default_factory=SessionOptions)
    files: FileLimits = field(default_factory=FileLimits)


class SessionManager:
    def __init__(
        self,
        pool: KernelPool,
        options: ManagerOptions | None = None,
        store: SessionStore | None = None,
    ) -> None:
        self.pool = pool
        self.options = opts = options or ManagerOptions()
        #: the registry's copy on disk (None: sessions end with the service)
        self.store = store
        self._saving: set[asyncio.Task[None]] = set()
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
        if self.store is None:
            await asyncio.gather(*(self._close(m) for m in sessions), return_exceptions=True)
        else:  # the sessions outlive the service: see `restore`
            results = await asyncio.gather(
                *(self._leave(m) for m in sessions), return_exceptions=True
            )
            for managed, result in zip(sessions, results, strict=True):
                if isinstance(result, BaseException):
                    log.error("session %s was not kept: %r", managed.id, result)
            await asyncio.gather(*self._saving, return_exceptions=True)
        await self.pool.close()
        await self.pool.workdirs.close()
        if self.store is not None:
            await self.store.close()

    async def _leave(self, managed: ManagedSession) -> None:
        """At shutdown: the session's record, with its kernel left running if it can be."""
        session = managed.session
        session.on_change = None
        record = self._record(managed)  # first: where the kernel runs, while it is ours
        if self.options.stop_kernels_on_shutdown:
            await session.close()
            kept = False
        else:
            kept = await session.detach()
        if not kept:
            record.kernel = None
            await self.pool.workdirs.release(session.workspace.root)
        assert self.store is not None
        await self.store.put(record)

    async def restore(self, records: list[SessionRecord]) -> None:
        """Bring back the sessions a previous service left (from the store): before `start`,
        with the backend made (its orphan reaping spared these sessions' kernels)."""
        for record in records:
            try:
                await self._restore(record)
            except Exception:
                log.exception("session %s could not be restored; it is removed", record.id)
                await self._forget_record(record)

    async def _restore(self, record: SessionRecord) -> None:
        workdirs = self.pool.workdirs
        if record.last_used_at + record.idle_timeout < time.time():
            log.info("session %s expired while the service was down; removing it", record.id)
            await self._forget_record(record)
            return
        workdir = await workdirs.reopen(record.workdir)
        if workdir is None:
            log.warning("session %s: its working directory is gone; removing it", record.id)
            await self._forget_record(record)
            return
        try:
            await self.slots.take(record.owner)
        except PoolExhausted as exc:
            log.warning("session %s not restored: %s", record.id, exc)
            await self._forget_record(record)
            return
        backend = self.backend
        paused = None
        notice = None
        if record.paused is not None:  # no kernel ran; the next execution resumes it
            paused = Report(**record.paused)
            kernel = Kernel.gone(workdir, "paused", backend.file_owner)
        else:
            kernel, why = await self._attach(record, workdir)
            if why is not None:
                log.info("session %s: restored without its kernel (%s)", record.id, why)
                notice = RESTORED_WITHOUT_KERNEL.format(why=why, lost=STATE_LOST)
        workspace = workdirs.workspace(workdir, record.id, self.options.files)
        workspace.adopt(kernel.proc)
        session = KernelSession(
            backend,
            kernel,
            workspace,
            options=self.options.session,
            env=record.env,
            session_id=record.id,
        )
        session.restored(record.execution_count, paused, notice)
        managed = ManagedSession(
            session=session,
            owner=record.owner,
            idle_timeout=record.idle_timeout,
            metadata=record.metadata,
            created_at=record.created_at,
            last_used_at=record.last_used_at,
        )
        self.sessions.add(managed)
        self._watch(managed)
        await self._save(managed)
        log.info("session %s restored (%s)", record.id, session.status)

    async def _attach(self, record: SessionRecord, workdir) -> tuple[Kernel, str | None]:
        """The record's kernel, running and answering; or a `gone` one, with why."""
        backend = self.backend
        if record.kernel is None:
            why = "it was stopped when the service stopped"
        elif record.kernel.get("backend") != backend.name:
            why = f"it ran on the {record.kernel.get('backend')} backend"
        else:
            try:
                return await Kernel.attach(
                    backend, record.kernel, self.options.attach_timeout
                ), None
            except CannotAttach:
                why = f"the {backend.name} backend's kernels end with the service"
            except KernelStartError as exc:
                why = str(exc)
        return Kernel.gone(workdir, why, backend.file_owner), why

    async def _forget_record(self, record: SessionRecord) -> None:
        """A session not restored: its kernel, its files and its record go."""
        if record.kernel is not None and record.kernel.get("backend") == self.backend.name:
            try:
                proc = await self.backend.attach(record.kernel)
            except CannotAttach:
                pass  # nothing of it outlives a service
            except Exception as exc:
                log.info("session %s: its kernel is gone already (%s)", record.id, exc)
            else:
                try:
                    await proc.kill()
                finally:
                    await proc.cleanup()
        with contextlib.suppress(ValueError):  # not an id: nothing of ours to remove
            workdir = self.pool.workdirs.path_of(record.workdir)
            if workdir.parent.is_dir():
                await self.pool.workdirs.remove(workdir)
        assert self.store is not None
        await self.store.delete(record.id)

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
        self._watch(managed)
        try:
            await self._save(managed)
        except BaseException:
            await self.delete(session.id, owner)
            raise
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
            await self._save(managed)

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

    # -- the store ------------------------------------------------------------------------

    def _record(self, managed: ManagedSession) -> SessionRecord:
        session = managed.session
        paused = session._paused
        return SessionRecord(
            id=managed.id,
            owner=managed.owner,
            idle_timeout=managed.idle_timeout,
            created_at=managed.created_at,
            last_used_at=managed.last_used_at,
            metadata=managed.metadata,
            env=session.env,
            execution_count=session.execution_count,
            workdir=session.workspace.root.parent.name,
            kernel=session.describe_kernel(),
            paused=None if paused is None else {"names": paused.names, "failed": paused.failed},
        )

    async def _save(self, managed: ManagedSession) -> None:
        """Write the session's record, if it is still registered (a deleted one stays so)."""
        if self.store is None or self.sessions.find(managed.id) is not managed:
            return
        await self.store.put(self._record(managed))

    def _watch(self, managed: ManagedSession) -> None:
        """Save the record whenever the session changes by itself (a kernel replaced after
        it died, a pause by the idle reaper), not only after the calls made here."""
        if self.store is None:
            return

        def changed() -> None:
            task = asyncio.get_running_loop().create_task(self._save(managed))
            self._saving.add(task)
            task.add_done_callback(self._saved)

        managed.session.on_change = changed

    def _saved(self, task: asyncio.Task[None]) -> None:
        self._saving.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a session's record could not be written: %r", exc)

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
        managed.session.on_change = None
        try:
            if self.store is not None:
                await self.store.delete(managed.id)
            await managed.session.close()
        finally:
            try:
                await remove_workspace(managed.session)
            finally:
                self.slots.give_back(managed.owner)
