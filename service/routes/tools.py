"""The tool endpoint: OpenAI tool calls in, tool messages out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from kernelbox_wire.models import ToolCallRequest, ToolCallResponse
from kernelbox_wire.tools import CODE_INTERPRETER_TOOL

from ..deps import App, BaseUrl, Owner

router = APIRouter(prefix="/v1/tools", tags=["tools"])


@router.get("")
async def list_tools(_: Owner) -> list[dict[str, Any]]:
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
    body: ToolCallRequest, application: App, owner: Owner, base_url: BaseUrl
) -> ToolCallResponse:
    """Run the model's tool call; without `session_id` a new session is made (its id is
    returned, so the next call sees the same variables). Malformed arguments come back as a
    tool message the model can act on, not as an HTTP error."""
    return await application.tool_call(owner, body, base_url=base_url)
