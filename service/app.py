"""The FastAPI app, built by a factory from Settings; the engine lives in its lifespan."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from kernelbox import __version__

from . import docs, errors, playground
from .application import Application
from .body_limit import BodyLimitMiddleware, limit_by_route
from .engine import Engine, open_local_engine
from .mcp import McpEndpoint
from .metrics import Metrics
from .routes import execute, files, health, render, sandboxfusion, sessions, tools
from .settings import Settings

log = logging.getLogger("kernelbox")


@contextlib.asynccontextmanager
async def open_engine(settings: Settings) -> AsyncIterator[Engine]:
    """This machine's engine, or (KERNELBOX_CLUSTER=ray) the kernel hosts of a Ray cluster."""
    if settings.cluster == "ray":
        from .cluster import open_ray_engine  # ray is an optional extra

        async with open_ray_engine(settings) as engine:
            yield engine
    else:
        async with open_local_engine(settings) as engine:
            yield engine


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    mcp = McpEndpoint(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_engine(settings) as engine:
            app.state.application = application = Application(settings, engine, metrics)
            where = "a Ray cluster's kernel hosts" if settings.cluster == "ray" else "this machine"
            log.info(
                "kernelbox ready: %s backend on %s, %d warm kernels wanted; open %s/ to try it",
                settings.backend,
                where,
                settings.min_idle,
                (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/"),
            )
            # MCP's session manager runs as long as the service (service/mcp.py).
            async with mcp.start(application):
                yield

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
