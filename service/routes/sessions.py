"""Sessions: create, list, get, delete; execute (JSON or SSE), interrupt, restart."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from kernelbox_wire.models import CreateSessionRequest, ExecuteRequest, Execution, Session

from .. import streaming
from ..deps import App, BaseUrl, Owner

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

ERRORS = {
    401: {"description": "Missing or invalid API key"},
    404: {"description": "No such session (or not yours)"},
}


@router.post(
    "",
    status_code=201,
    response_model=Session,
    responses={
        **ERRORS,
        429: {"description": "Every session slot is taken; see Retry-After"},
        503: {"description": "No kernel could be started"},
    },
)
async def create_session(
    application: App, owner: Owner, body: CreateSessionRequest | None = None
) -> Session:
    """A new stateful session, served from the warm pool."""
    return await application.create_session(owner, body or CreateSessionRequest())


@router.get("", response_model=list[Session], responses=ERRORS)
async def list_sessions(application: App, owner: Owner) -> list[Session]:
    return await application.list_sessions(owner)


@router.get("/{session_id}", response_model=Session, responses=ERRORS)
async def get_session(session_id: str, application: App, owner: Owner) -> Session:
    return await application.get_session(session_id, owner)


@router.delete("/{session_id}", status_code=204, responses=ERRORS)
async def delete_session(session_id: str, application: App, owner: Owner) -> Response:
    """Stop the kernel and remove the session's files."""
    await application.delete_session(session_id, owner)
    return Response(status_code=204)


@router.post(
    "/{session_id}/execute",
    response_model=Execution,
    responses={
        **ERRORS,
        409: {"description": "The session is running other code"},
        200: {
            "description": "The Execution; or, with `stream: true` or "
            "`Accept: text/event-stream`, server-sent events `stdout`, `stderr`, `result`, "
            "`error` and a final `end` carrying the Execution.",
            "content": {"text/event-stream": {}},
        },
    },
)
async def execute(
    session_id: str,
    body: ExecuteRequest,
    request: Request,
    application: App,
    owner: Owner,
    base_url: BaseUrl,
):
    """Run code in the session; variables persist between calls."""

    def run(on_event):
        return application.execute(session_id, owner, body, base_url=base_url, on_event=on_event)

    if streaming.wanted(request, body.stream):
        await application.check_execute(session_id, owner, body.code)  # 413, 404, 409 now
        return streaming.stream(run)
    return await run(None)


@router.post("/{session_id}/interrupt", responses=ERRORS)
async def interrupt(session_id: str, application: App, owner: Owner) -> dict[str, bool]:
    """Send an interrupt (like Ctrl-C) to running code; `interrupted` says if any ran."""
    return {"interrupted": await application.interrupt(session_id, owner)}


@router.post(
    "/{session_id}/pause",
    response_model=Session,
    responses={
        **ERRORS,
        409: {"description": "The session is running code, or its variables cannot be saved"},
    },
)
async def pause(session_id: str, application: App, owner: Owner) -> Session:
    """Save the session's variables into its working directory and stop its kernel, freeing
    its memory; the next execute resumes it in a fresh kernel with them restored, and says
    which could not be (`not_restored`). Files are kept. Pausing a paused session is a no-op."""
    return await application.pause(session_id, owner)


@router.post("/{session_id}/restart", response_model=Session, responses=ERRORS)
async def restart(session_id: str, application: App, owner: Owner) -> Session:
    """A fresh kernel in the same working directory: variables are lost, files kept."""
    return await application.restart(session_id, owner)


@router.get(
    "/{session_id}/notebook",
    responses={
        **ERRORS,
        200: {
            "description": "The session's history as a Jupyter notebook (nbformat 4): each "
            "execution a code cell with its outputs and images, in order.",
            "content": {"application/x-ipynb+json": {}},
        },
    },
)
async def notebook(session_id: str, application: App, owner: Owner) -> Response:
    """The session's history as an `.ipynb`, valid by nbformat's validator."""
    text = await application.notebook(session_id, owner)
    return Response(
        text,
        media_type="application/x-ipynb+json",
        headers={"Content-Disposition": f'attachment; filename="{session_id}.ipynb"'},
    )
