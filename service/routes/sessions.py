"""Sessions: create, list, get, delete; execute (JSON or SSE), interrupt, restart."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request, Response

from kernelbox.models import CreateSessionRequest, ExecuteRequest, Execution, Session
from sandbox.errors import SessionBusy
from sandbox.manager import SessionManager

from .. import executions
from ..auth import require_owner

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

ERRORS = {
    401: {"description": "Missing or invalid API key"},
    404: {"description": "No such session (or not yours)"},
}


def manager(request: Request) -> SessionManager:
    return request.app.state.manager


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
    request: Request, body: CreateSessionRequest | None = None, owner: str = Depends(require_owner)
) -> Session:
    """A new stateful session, served from the warm pool."""
    body = body or CreateSessionRequest()
    managed = await manager(request).create(
        owner, idle_timeout=body.idle_timeout, env=body.env, metadata=body.metadata
    )
    return managed.to_model()


@router.get("", response_model=list[Session], responses=ERRORS)
async def list_sessions(request: Request, owner: str = Depends(require_owner)) -> list[Session]:
    return [m.to_model() for m in manager(request).list(owner)]


@router.get("/{session_id}", response_model=Session, responses=ERRORS)
async def get_session(
    session_id: str, request: Request, owner: str = Depends(require_owner)
) -> Session:
    return manager(request).get(session_id, owner).to_model()


@router.delete("/{session_id}", status_code=204, responses=ERRORS)
async def delete_session(
    session_id: str, request: Request, owner: str = Depends(require_owner)
) -> Response:
    """Stop the kernel and remove the session's files."""
    await manager(request).delete(session_id, owner)
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
    session_id: str, body: ExecuteRequest, request: Request, owner: str = Depends(require_owner)
):
    """Run code in the session; variables persist between calls."""
    executions.check_code(request, body.code)
    mgr = manager(request)
    managed = mgr.get(session_id, owner)
    started = time.perf_counter()

    def finalize(execution: Execution) -> Execution:
        return executions.finish(
            request, execution, session_id=session_id, fmt=body.format, started=started
        )

    def run(on_event):
        return mgr.execute(session_id, owner, body.code, body.timeout, on_event)

    if executions.wants_stream(request, body.stream):
        if managed.busy:  # answer 409 now, not inside an event stream
            raise SessionBusy(f"session {session_id} is already running code")
        return executions.stream(run, finalize)
    return finalize(await run(None))


@router.post("/{session_id}/interrupt", responses=ERRORS)
async def interrupt(
    session_id: str, request: Request, owner: str = Depends(require_owner)
) -> dict[str, bool]:
    """Send an interrupt (like Ctrl-C) to running code; `interrupted` says if any ran."""
    return {"interrupted": await manager(request).interrupt(session_id, owner)}


@router.post("/{session_id}/restart", response_model=Session, responses=ERRORS)
async def restart(
    session_id: str, request: Request, owner: str = Depends(require_owner)
) -> Session:
    """A fresh kernel in the same working directory: variables are lost, files kept."""
    return (await manager(request).restart(session_id, owner)).to_model()
