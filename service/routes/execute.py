"""One-shot execution: a fresh interpreter, discarded afterwards."""

from __future__ import annotations

from fastapi import APIRouter, Request

from kernelbox_wire.models import ExecuteRequest, Execution

from .. import streaming
from ..deps import App, Owner

router = APIRouter(tags=["execute"])


@router.post(
    "/v1/execute",
    response_model=Execution,
    responses={
        401: {"description": "Missing or invalid API key"},
        429: {"description": "Every slot is taken; see Retry-After"},
    },
)
async def execute_once(body: ExecuteRequest, request: Request, application: App, owner: Owner):
    """Stateless: nothing of this run is visible to any other. Images come back as data URLs."""

    def run(on_event):
        return application.run_once(owner, body, on_event=on_event)

    if streaming.wanted(request, body.stream):
        application.check_code(body.code)  # 413 now, not inside an event stream
        return streaming.stream(run)
    return await run(None)
