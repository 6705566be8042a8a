"""The FastAPI app, built by a factory from Settings; the engine lives in its lifespan."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI

from kernelbox import __version__
from kernelbox_server.sandbox.backends import registry
from kernelbox_server.sandbox.backends.base import KernelBackend, KernelConfig, Limits
from kernelbox_server.sandbox.capture import CaptureLimits
from kernelbox_server.sandbox.files import FileIO, FileLimits
from kernelbox_server.sandbox.forkserver import ForkServer, ForkServerOptions
from kernelbox_server.sandbox.manager import ManagerOptions, SessionManager
from kernelbox_server.sandbox.pool import KernelPool
from kernelbox_server.sandbox.session import SessionOptions
from kernelbox_server.sandbox.store import SessionStore
from kernelbox_server.sandbox.workdirs import Workdirs

from . import docs, errors, playground
from .application import Application
from .body_limit import BodyLimitMiddleware, limit_by_route
from .mcp import McpEndpoint
from .metrics import Metrics
from .routes import execute, files, health, render, sandboxfusion, sessions, tools
from .settings import Settings

log = logging.getLogger("kernelbox")


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


def check_isolation(settings: Settings, backend: KernelBackend) -> None:
    """Several keys on a backend that cannot keep kernels apart would let one key's code reach
    another's sessions: refuse, unless told to accept it."""
    report = backend.isolation  # what is missing, the backend has said already
    log.info("isolation: %s", report)
    if report.get("weak") and len(settings.api_key) > 1 and not settings.allow_weak_isolation:
        missing = "; ".join(report.get("missing", [])) or "see /readyz"
        raise RuntimeError(
            f"{len(settings.api_key)} API keys, but the {backend.name} backend cannot isolate "
            f"their kernels from each other ({missing}). Fix that, or set "
            "KERNELBOX_ALLOW_WEAK_ISOLATION=1 to accept it."
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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    mcp = McpEndpoint(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        io = FileIO()
        # Sessions outlive the service: their files under the data directory, their records
        # in its store; one service per data directory (Workdirs holds its lock).
        workdirs = Workdirs(
            settings.data_dir, io, settings.disk_mb * 1024**2, settings.workdir_mount
        )
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
            check_isolation(settings, backend)
        except BaseException:
            await backend.close()
            await store.close()
            await workdirs.close()
            io.close()
            raise
        pool = KernelPool(backend, workdirs, min_idle=settings.min_idle)
        fork_options = forkserver_options(settings)
        manager = SessionManager(
            pool, manager_options(settings, fork_options.total_slots), store=store
        )
        forkserver = ForkServer(backend, fork_options)  # its templates start on first use
        app.state.application = application = Application(settings, manager, forkserver, metrics)
        try:
            await manager.restore(records)
        except BaseException:
            await manager.close()
            await backend.close()
            io.close()
            raise
        manager.start()
        log.info(
            "kernelbox ready: %s backend, %d warm kernels wanted; open %s/ to try it",
            backend.name,
            settings.min_idle,
            (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/"),
        )
        try:
            # MCP's session manager runs as long as the service (service/mcp.py).
            async with mcp.start(application):
                yield
        finally:
            # Graceful shutdown: sessions are kept (their records, their files, and their
            # kernels where the backend can keep them running); everything else stops.
            try:
                try:
                    await forkserver.close()
                finally:
                    await manager.close()
            finally:
                await backend.close()
                io.close()

    app = FastAPI(
        title="kernelbox",
        version=__version__,
        summary="Sandboxed, stateful Python code interpreter for LLM agents.",
        lifespan=lifespan,
        # The pages are served with their assets from the package (service/docs.py).
        docs_url=None,
        redoc_url=None,
        # A body without Content-Type is JSON only where every request needs a key: a browser
        # can send such a body to another origin without asking first (no CORS preflight),
        # but never with the key, so only a keyless (loopback) service must refuse it.
        strict_content_type=not settings.api_key,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        limit_for=limit_by_route(settings.max_body_bytes, settings.max_file_bytes),
    )
    app.state.settings = settings
    errors.install(app)
    docs.install(app)
    playground.install(app)
    app.include_router(health.router)
    app.include_router(sessions.router)
    app.include_router(files.router)
    app.include_router(execute.router)
    app.include_router(tools.router)
    app.include_router(render.router)
    app.include_router(sandboxfusion.router)
    app.router.routes.append(mcp.route())
    return app
