"""Liveness, readiness and Prometheus metrics (no auth: probes and scrapers call these)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import error_response

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "The pool cannot serve"}})
async def readyz(request: Request):
    """The pool can serve a session now or soon (a backend that fails to start kernels is not)."""
    pool = request.app.state.manager.pool
    if pool.ready:
        return {
            "status": "ready",
            "idle_kernels": pool.idle,
            "isolation": request.app.state.manager.backend.isolation,
        }
    return error_response(503, "not_ready", pool.last_error or "the pool is not ready")


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state = request.app.state
    state.metrics.sync(state.manager)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
