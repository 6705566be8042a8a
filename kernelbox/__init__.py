"""kernelbox: a sandboxed, stateful Python code interpreter for LLM agents.

    from kernelbox import Client

    with Client() as client, client.create_session() as session:
        print(session.execute("x = 6 * 7\\nprint(x)").stdout)

The client needs only httpx and pydantic; the service is the `server` extra.
"""

from kernelbox_wire.events import EndEvent, ErrorEvent, Event, ResultEvent, StderrEvent, StdoutEvent
from kernelbox_wire.models import ErrorInfo, Execution, FileEntry, Image, RenderOptions, Result
from kernelbox_wire.models import Session as SessionInfo
from kernelbox_wire.tools import CODE_INTERPRETER_TOOL, TOOL_NAME

from .async_client import AsyncClient, AsyncExecutionStream, AsyncSession
from .client import Client, ExecutionStream, Session
from .errors import (
    APIError,
    ConnectionError,
    ExecutionError,
    ExecutionTimeout,
    FileNotFound,
    InvalidRequest,
    KernelboxError,
    KernelDied,
    NotFound,
    PayloadTooLarge,
    PoolExhausted,
    RequestTimeout,
    ServiceUnavailable,
    SessionBusy,
    SessionLost,
    SessionNotFound,
    Unauthorized,
)
from .rendering import render

__version__ = "0.1.0"

__all__ = [
    "CODE_INTERPRETER_TOOL",
    "TOOL_NAME",
    "APIError",
    "AsyncClient",
    "AsyncExecutionStream",
    "AsyncSession",
    "Client",
    "ConnectionError",
    "EndEvent",
    "ErrorEvent",
    "ErrorInfo",
    "Event",
    "Execution",
    "ExecutionError",
    "ExecutionStream",
    "ExecutionTimeout",
    "FileEntry",
    "FileNotFound",
    "Image",
    "InvalidRequest",
    "KernelDied",
    "KernelboxError",
    "NotFound",
    "PayloadTooLarge",
    "PoolExhausted",
    "RenderOptions",
    "RequestTimeout",
    "Result",
    "ResultEvent",
    "ServiceUnavailable",
    "Session",
    "SessionBusy",
    "SessionInfo",
    "SessionLost",
    "SessionNotFound",
    "StderrEvent",
    "StdoutEvent",
    "Unauthorized",
    "render",
]
