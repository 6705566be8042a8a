"""The FastAPI dependencies every router uses, declared once: who calls, and what serves it."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .application import Application
from .auth import require_owner


def application(request: Request) -> Application:
    return request.app.state.application


def base_url(request: Request) -> str:
    """Where links in answers point: the configured public URL, else the one called."""
    return (request.app.state.settings.public_url or str(request.base_url)).rstrip("/")


App = Annotated[Application, Depends(application)]
Owner = Annotated[str, Depends(require_owner)]
BaseUrl = Annotated[str, Depends(base_url)]
