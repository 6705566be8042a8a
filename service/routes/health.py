"""Liveness, readiness and Prometheus metrics (no auth: probes and scrapers call these)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import App
from ..errors import error_response

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "The pool cannot serve"}})
async def readyz(application: App):
    """The pool can serve a session now or soon (a backend that fails to start kernels is not)."""
    why, report = await application.readiness()
    if why is not None:
        return error_response(503, "not_ready", why)
    return report


@router.get("/metrics", response_class=Response)
async def metrics(application: App) -> Response:
    return Response(await application.scrape(), media_type=CONTENT_TYPE_LATEST)
