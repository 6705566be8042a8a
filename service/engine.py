"""What the application layer runs on: the engine on this machine, or spread over a cluster.

`Engine` is every operation the application layer needs, in wire models (`Session`,
`Execution`) and the engine's plain records, so that where it runs does not show above it:
`LocalEngine` is this machine's SessionManager and fork server; the Ray mode
(`cluster/engine.py`) routes the same calls to kernel hosts on the cluster's nodes, each of
which is a `LocalEngine`. `open_local_engine` builds one from Settings (it was the service's
lifespan).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kernelbox_server.sandbox.backends import registry
from kernelbox_server.sandbox.backends.base import KernelBackend, KernelConfig, Limits
from kernelbox_server.sandbox.capture import CaptureLimits
from kernelbox_server.sandbox.files import FileIO, FileLimits, Listing
from kernelbox_server.sandbox.forkserver import ForkServer, ForkServerOptions, RunRequest, RunResult
from kernelbox_server.sandbox.manager import ManagerOptions, NotebookRun, SessionManager
from kernelbox_server.sandbox.pool import KernelPool
from kernelbox_server.sandbox.session import OnEvent, SessionOptions
from kernelbox_server.sandbox.store import SessionStore
from kernelbox_server.sandbox.workdirs import Workdirs
from kernelbox_wire.models import Execution, Session

from .settings import Settings

log = logging.getLogger("kernelbox")


@dataclass
class EngineStatus:
    """What readiness and the metrics report."""

    #: why no session can be served now or soon (None: it can)
    not_ready: str | None
    idle_kernels: int
    sessions: int
    reaped_total: int
    isolation: dict[str, Any] = field(default_factory=dict)
    #: the Ray mode: each kernel host's own status, by host name
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)


class Files(Protocol):
    """A session's working directory, as the application layer reaches it (workspace.py)."""

    async def list(self) -> Listing: ...

    async def write(self, path: str, data: bytes) -> None: ...

    async def stream(self, path: str) -> tuple[int, AsyncIterator[bytes]]: ...

    async def delete(self, path: str) -> None: ...


class Engine(Protocol):
    async def create(
        self,
        owner: str,
        *,
        idle_timeout: float | None = None,
        env: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session: ...

    async def list(self, owner: str) -> list[Session]: ...

    async def get(self, session_id: str, owner: str) -> Session: ...

    async def delete(self, session_id: str, owner: str) -> None: ...

    async def check_idle(self, session_id: str, owner: str) -> None: ...

    async def execute(
        self,
        session_id: str,
        owner: str,
        code: str,
        timeout: float | None = None,
        on_event: OnEvent | None = None,
    ) -> Execution: ...

    async def interrupt(self, session_id: str, owner: str) -> bool: ...

    async def restart(self, session_id: str, owner: str) -> Session: ...

    async def pause(self, session_id: str, owner: str) -> Session: ...

    def files(self, session_id: str, owner: str) -> Files: ...

    async def notebook(self, session_id: str, owner: str) -> str: ...

    async def run_once(
        self,
        owner: str,
        code: str,
        timeout: float | None = None,
        on_event: OnEvent | None = None,
    ) -> Execution: ...

    async def run_program(self, owner: str, request: RunRequest) -> RunResult: ...

    async def run_notebook(
        self,
        owner: str,
        cells: list[str],
        *,
        total_timeout: float,
        cell_timeout: float | None,
        files: dict[str, bytes],
        fetch: Sequence[str],
    ) -> NotebookRun: ...

    async def status(self) -> EngineStatus: ...


class LocalEngine:
    """The engine on this machine: one SessionManager (sessions, the warm pool, the backend)
    and the fork server that runs stateless programs."""

    def __init__(self, manager: SessionManager, forkserver: ForkServer) -> None:
        self.manager = manager
        self.forkserver = forkserver

    async def create(
        self,
        owner: str,
        *,
        idle_timeout: float | None = None,
        env: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        managed = await self.manager.create(
            owner, idle_timeout=idle_timeout, env=env, metadata=metadata
        )
        return managed.to_model()

    async def list(self, owner: str) -> list[Session]:
        return [m.to_model() for m in self.manager.list(owner)]

    async def get(self, session_id: str, owner: str) -> Session:
        return self.manager.get(session_id, owner).to_model()

    async def delete(self, session_id: str, owner: str) -> None:
        await self.manager.delete(session_id, owner)

    async def check_idle(self, session_id: str, owner: str) -> None:
        self.manager.check_idle(session_id, owner)

    async def execute(
        self,
        session_id: str,
        owner: str,
        code: str,
        timeout: float | None = None,
        on_event: OnEvent | None = None,
    ) -> Execution:
        return await self.manager.execute(session_id, owner, code, timeout, on_event)

    async def interrupt(self, session_id: str, owner: str) -> bool:
        return await self.manager.interrupt(session_id, owner)

    async def restart(self, session_id: str, owner: str) -> Session:
        return (await self.manager.restart(session_id, owner)).to_model()

    async def pause(self, session_id: str, owner: str) -> Session:
        return (await self.manager.pause(session_id, owner)).to_model()

    def files(self, session_id: str, owner: str) -> Files:
        return self.manager.files(session_id, owner)

    async def notebook(self, session_id: str, owner: str) -> str:
        return await self.manager.notebook(session_id, owner)

    async def run_once(
        self,
        owner: str,
        code: str,
        timeout: float | None = None,
        on_event: OnEvent | None = None,
    ) -> Execution:
        return await self.manager.run_once(owner, code, timeout, on_event)

    async def run_program(self, owner: str, request: RunRequest) -> RunResult:
        async with self.manager.run_slot(owner):
            return await self.forkserver.run(request)

    async def run_notebook(
        self,
        owner: str,
        cells: list[str],
        *,
        total_timeout: float,
        cell_timeout: float | None,
        files: dict[str, bytes],
        fetch: Sequence[str],
    ) -> NotebookRun:
        return await self.manager.run_notebook(
            owner,
            cells,
            total_timeout=total_timeout,
            cell_timeout=cell_timeout,
            files=files,
            fetch=fetch,
        )

    async def status(self) -> EngineStatus:
        pool = self.manager.pool
        return EngineStatus(
            not_ready=None if pool.ready else pool.last_error or "the pool is not ready",
            idle_kernels=pool.idle,
            sessions=self.manager.count,
            reaped_total=self.manager.reaped_total,
            isolation=self.manager.backend.isolation,
        )


# -- building it from the settings ------------------------------------------------------------


def kernel_config(settings: Settings) -> KernelConfig:
    return KernelConfig(
        limits=Limits(
            memory_bytes=settings.memory_mb * 1024**2,
            cpus=settings.cpus,
            pids=settings.pids,
            file_size_bytes=settings.max_file_bytes * 10,
            disk_bytes=settings.disk_mb * 1024**2,
        ),
        output_cap_chars=settings.max_output_chars,
        max_message_bytes=settings.max_execution_bytes,
    )


def build_backend(settings: Settings) -> KernelBackend:
    """The backend named by the settings, found in the registry (entry points)."""
    return registry.build(settings.backend, kernel_config(settings), settings)


def check_isolation(settings: Settings, report: dict[str, Any], where: str) -> None:
    """Several keys on a backend that cannot keep kernels apart (its isolation `report`)
    would let one key's code reach another's sessions: refuse, unless told to accept it."""
    log.info("isolation of %s: %s", where, report)
    if report.get("weak") and len(settings.api_key) > 1 and not settings.allow_weak_isolation:
        missing = "; ".join(report.get("missing", [])) or "see /readyz"
        raise RuntimeError(
            f"{len(settings.api_key)} API keys, but {where} cannot isolate their kernels from "
            f"each other ({missing}). Fix that, or set KERNELBOX_ALLOW_WEAK_ISOLATION=1 to "
            "accept it."
        )


def without_keys(settings: Settings) -> Settings:
    """The settings an engine elsewhere needs (a kernel host): the keys' shares worked out,
    the keys themselves left out (they are checked by the fronts, and Ray keeps an actor's
    arguments in its control store)."""
    run_slots = forkserver_options(settings).total_slots
    return settings.model_copy(
        update={
            "api_key": [],
            "api_key_file": None,
            "max_sessions_per_key": settings.max_sessions_per_key
            or settings.per_key(settings.max_sessions),
            "max_runs_per_key": settings.max_runs_per_key or settings.per_key(run_slots),
        }
    )


def forkserver_options(settings: Settings) -> ForkServerOptions:
    templates = settings.run_code_templates or min(os.cpu_count() or 1, 4)
    preload = tuple(m.strip() for m in settings.run_code_preload.split(",") if m.strip())
    return ForkServerOptions(templates=templates, slots=settings.run_code_slots, preload=preload)


def manager_options(settings: Settings, run_slots: int) -> ManagerOptions:
    return ManagerOptions(
        max_sessions=settings.max_sessions,
        max_sessions_per_owner=settings.max_sessions_per_key
        or settings.per_key(settings.max_sessions),
        max_runs_per_owner=settings.max_runs_per_key or settings.per_key(run_slots),
        default_idle_timeout=settings.idle_timeout,
        max_idle_timeout=settings.max_idle_timeout,
        pause_after=settings.pause_after,
        acquire_wait=settings.pool_wait,
        stop_kernels_on_shutdown=settings.stop_kernels_on_shutdown,
        session=SessionOptions(
            default_timeout=settings.default_timeout,
            max_timeout=settings.max_timeout,
            interrupt_grace=settings.interrupt_grace,
            capture=CaptureLimits(
                max_chars=settings.max_output_chars,
                max_execution_bytes=settings.max_execution_bytes,
            ),
        ),
        files=FileLimits(max_file_bytes=settings.max_file_bytes),
    )


@contextlib.asynccontextmanager
async def open_local_engine(settings: Settings) -> AsyncIterator[LocalEngine]:
    """The engine on this machine, its sessions restored from `settings.data_dir`; on leaving,
    sessions are kept (their records, their files, and their kernels where the backend can
    keep them running) and everything else stops."""
    io = FileIO()
    # Sessions outlive the service: their files under the data directory, their records in
    # its store; one engine per data directory (Workdirs holds its lock).
    workdirs = Workdirs(settings.data_dir, io, settings.disk_mb * 1024**2, settings.workdir_mount)
    store = SessionStore(settings.data_dir)
    try:
        records = await store.open()
        await workdirs.remove_stale(keep={r.workdir for r in records})
        # Its orphan reaping spares the kernels of the stored sessions.
        backend = build_backend(settings)
    except BaseException:
        await store.close()
        await workdirs.close()
        io.close()
        raise
    try:
        check_isolation(settings, backend.isolation, f"the {backend.name} backend")
    except BaseException:
        await backend.close()
        await store.close()
        await workdirs.close()
        io.close()
        raise
    pool = KernelPool(backend, workdirs, min_idle=settings.min_idle)
    fork_options = forkserver_options(settings)
    manager = SessionManager(pool, manager_options(settings, fork_options.total_slots), store=store)
    forkserver = ForkServer(backend, fork_options)  # its templates start on first use
    try:
        try:
            await manager.restore(records)
            manager.start()
            yield LocalEngine(manager, forkserver)
        finally:
            # The manager closes the store and the working directories (restore's failure too).
            try:
                await forkserver.close()
            finally:
                await manager.close()
    finally:
        await backend.close()
        io.close()
