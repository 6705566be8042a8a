"""The playground at `/`: a page of the service's own (service/static/playground/, plain
JavaScript with the Ace editor vendored beside it; no CDN, no build step) that speaks the
public HTTP API like any client. It holds no state on the server and needs no route of its
own beyond the page, its assets and what it should ask for (an API key, the formats)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from kernelbox import __version__
from kernelbox_wire.models import Envelope, Style

PAGE = Path(__file__).parent / "static" / "playground"

# Code from the kernel reaches the page (HTML results, SVG, text): no script but the page's
# own may run, and nothing may be loaded from elsewhere. HTML results are shown in sandboxed
# frames without scripts besides; Ace adds its styles inline, hence 'unsafe-inline' there.
CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "frame-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}


def install(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE / "index.html", headers=HEADERS)

    # Registered before the mount below, which would otherwise answer for it.
    @app.get("/playground/config.json", include_in_schema=False)
    async def config(request: Request) -> dict[str, Any]:
        """What the page asks before its first call: whether to ask for a key, which
        renderings to offer (styles and envelopes, as `format` takes them)."""
        return {
            "auth": bool(request.app.state.settings.api_key),
            "formats": [*get_args(Style), *get_args(Envelope)],
            "version": __version__,
        }

    app.mount("/playground", StaticFiles(directory=PAGE), name="playground")
