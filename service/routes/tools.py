"""The tool endpoint: OpenAI tool calls in, tool messages out."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request

from kernelbox_wire.models import (
    ErrorInfo,
    Execution,
    OutputRef,
    ToolCallRequest,
    ToolCallResponse,
    render_options,
)
from kernelbox_wire.render import render_message
from kernelbox_wire.tools import CODE_INTERPRETER_TOOL, InvalidArguments, extract_code

from .. import executions
from ..auth import require_owner
from .sessions import manager

router = APIRouter(prefix="/v1/tools", tags=["tools"])


@router.get("")
async def list_tools(_: str = Depends(require_owner)) -> list[dict[str, Any]]:
    """The OpenAI `tools` entry for `code_interpreter`, ready to pass to a model."""
    return [CODE_INTERPRETER_TOOL]


@router.post(
    "/code_interpreter",
    response_model=ToolCallResponse,
    responses={
        401: {"description": "Missing or invalid API key"},
        404: {"description": "No such session (or not yours)"},
        409: {"description": "The session is running other code"},
    },
)
async def call_code_interpreter(
    body: ToolCallRequest, request: Request, owner: str = Depends(require_owner)
) -> ToolCallResponse:
    """Run the model's tool call; without `session_id` a new session is made (its id is
    returned, so the next call sees the same variables). Malformed arguments come back as a
    tool message the model can act on, not as an HTTP error."""
    # The arguments are checked first: a call refused with 413 must not leave a new session.
    try:
        code, invalid = extract_code(body.arguments), None
        executions.check_code(request, code)
    except InvalidArguments as exc:
        code, invalid = "", exc
    mgr = manager(request)
    if body.session_id is None:
        # Short-lived unless used again: a model that never comes back must not hold a slot.
        idle = request.app.state.settings.tool_session_idle_timeout
        session_id = (await mgr.create(owner, idle_timeout=idle)).id
    else:
        session_id = mgr.get(body.session_id, owner).id
    started = time.perf_counter()
    if invalid is not None:
        execution = Execution(
            status="error",
            error=ErrorInfo(name="InvalidArguments", value=str(invalid)),
            outputs=[OutputRef(type="error")],
        )
    else:
        execution = await mgr.execute(session_id, owner, code, body.timeout)
    options = render_options(body.format, default_envelope="openai")
    execution = executions.finish(
        request, execution, session_id=session_id, fmt=None, started=started
    )
    message = render_message(execution, options, tool_call_id=body.tool_call_id)
    return ToolCallResponse(session_id=session_id, message=message, execution=execution)
