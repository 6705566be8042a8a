"""Server-sent events for the execute routes: events as they happen, then `end`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse
from fastapi.sse import format_sse_event

from kernelbox_server.sandbox.session import OnEvent
from kernelbox_wire.models import ErrorBody, ErrorDetail, Execution

from .errors import ENGINE_ERRORS

log = logging.getLogger(__name__)

Run = Callable[[OnEvent | None], Awaitable[Execution]]


def wanted(request: Request, stream_flag: bool) -> bool:
    return stream_flag or "text/event-stream" in request.headers.get("accept", "")


def stream(run: Run) -> StreamingResponse:
    """Server-sent events: `stdout`, `stderr`, `result`, `error` as they happen, then `end`
    with the whole Execution. A client that goes away does not stop the code."""
    queue: asyncio.Queue[tuple[str, object] | None] = asyncio.Queue()

    def on_event(kind: str, data: dict) -> None:
        queue.put_nowait((kind, data))

    async def produce() -> Execution:
        try:
            return await run(on_event)
        finally:
            queue.put_nowait(None)

    async def events() -> AsyncIterator[bytes]:
        task = asyncio.create_task(produce())
        task.add_done_callback(_log_failure)
        while (item := await queue.get()) is not None:
            kind, data = item
            yield format_sse_event(event=kind, data_str=json.dumps(data))
        try:
            execution = await task
            yield format_sse_event(event="end", data_str=execution.model_dump_json())
        except Exception as exc:  # the response has started: no status left to send
            if type(exc) in ENGINE_ERRORS:
                detail = ErrorDetail(code=ENGINE_ERRORS[type(exc)][1], message=str(exc))
            else:
                log.error("streamed execution failed", exc_info=exc)
                detail = ErrorDetail(code="internal", message="internal error; see the log")
            body = ErrorBody(error=detail)
            yield format_sse_event(event="fail", data_str=body.model_dump_json(exclude_none=True))

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("streamed execution ended with %r", task.exception())
