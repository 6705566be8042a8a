"""One-shot execution: a fresh interpreter, discarded afterwards."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from kernelbox_wire.models import ExecuteRequest, Execution

from .. import executions
from ..auth import require_owner

router = APIRouter(tags=["execute"])


@router.post(
    "/v1/execute",
    response_model=Execution,
    responses={
        401: {"description": "Missing or invalid API key"},
        429: {"description": "Every slot is taken; see Retry-After"},
    },
)
async def execute_once(body: ExecuteRequest, request: Request, owner: str = Depends(require_owner)):
    """Stateless: nothing of this run is visible to any other. Images come back as data URLs."""
    executions.check_code(request, body.code)
    started = time.perf_counter()
    mgr = request.app.state.manager

    def finalize(execution: Execution) -> Execution:
        return executions.finish(
            request, execution, session_id=None, fmt=body.format, started=started
        )

    def run(on_event):
        return mgr.run_once(owner, body.code, body.timeout, on_event)

    if executions.wants_stream(request, body.stream):
        return executions.stream(run, finalize)
    return finalize(await run(None))
