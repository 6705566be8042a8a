"""MCP at `/mcp`: the code interpreter as Model Context Protocol tools, over streamable HTTP.

A thin adapter over `Application`, like the HTTP routes: each tool translates its arguments
into one application call and the answer into MCP content. State lives in explicit, opaque
handles (the 2026-07-28 revision's way: no state is tied to the transport's own session):
`create_session` returns a `session_id`, which `run_code`, the file tools and
`delete_session` take. A handle belongs to the API key that made it (the same bearer keys
as the HTTP API, checked on every MCP HTTP request) and ends with its session (deleted, or
unused past its idle timeout); an unknown, expired or another key's handle is a tool error
(`isError`) that says so, without telling which of the three it is.

Results of `run_code`: the model-ready text (`kernelbox_wire.render`, qwen style) as text
content, each PNG/JPEG image as image content, and the whole `Execution` as
`structuredContent` (the tool declares its `outputSchema`). Output is reported as progress
notifications while the code runs, to clients that ask for progress.

The transport runs stateless: every POST stands alone (the SDK serves 2026-07-28 requests
that way in any case), so a request is authorised by its own key, never by an earlier one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import mimetypes
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from pydantic import Field
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kernelbox import __version__
from kernelbox_server.sandbox.errors import (
    KernelStartError,
    PoolExhausted,
    SessionBusy,
    SessionClosed,
    SessionNotFound,
)
from kernelbox_server.sandbox.files import FileOpTimeout, FileTooLarge, UnsafePath
from kernelbox_wire.models import CreateSessionRequest, ExecuteRequest, Execution, FileEntry
from kernelbox_wire.render import image_base64
from kernelbox_wire.tools import TOOL_DESCRIPTION

from .application import Application, CodeTooLarge
from .auth import authenticate, key_from_header
from .errors import ApiError, error_response
from .settings import Settings

log = logging.getLogger(__name__)

PATH = "/mcp"
#: the most of a file `read_file` returns (the MCP answer is one JSON message)
MAX_READ_BYTES = 8 * 1024**2
#: the most text one progress notification carries
PROGRESS_CHARS = 2000
#: image types sent as image content (what models take); others stay files
MODEL_IMAGES = ("image/png", "image/jpeg", "image/gif", "image/webp")

INSTRUCTIONS = (
    "A sandboxed Python code interpreter. Call create_session for a stateful interpreter and "
    "pass its session_id to run_code: variables, imports and files persist between calls of "
    "one session. run_code without a session_id runs once in a fresh interpreter. Sessions "
    "end when deleted or after a while unused; a handle that has ended gives an error."
)

SessionId = Annotated[
    str, Field(description="The handle create_session returned (opaque; owned by your key).")
]
Path = Annotated[
    str, Field(description="Relative to the session's working directory, e.g. 'data.csv'.")
]


def _owner(ctx: Context) -> str:
    """Who calls: set on the HTTP request by `_Authenticated` before the SDK saw it."""
    request = ctx.request_context.request
    owner = getattr(getattr(request, "state", None), "kernelbox_owner", None)
    if owner is None:  # every request to the mount is authenticated first
        raise ToolError("unauthenticated request")
    return owner


def _base_url(ctx: Context, settings: Settings) -> str:
    if settings.public_url:
        return settings.public_url.rstrip("/")
    request = ctx.request_context.request
    return str(getattr(request, "base_url", "")).rstrip("/")


def _handle_error(session_id: str, settings: Settings) -> ToolError:
    return ToolError(
        f"unknown or expired session_id {session_id!r}: it was deleted, unused for longer than "
        f"its idle timeout (default {settings.idle_timeout:g} s), or made with another API "
        "key. Call create_session for a new one (its variables and files are gone)."
    )


@contextlib.contextmanager
def _tool_errors(session_id: str | None, settings: Settings):
    """Engine errors as tool errors (isError results) in words a model can act on."""
    try:
        yield
    except (SessionNotFound, SessionClosed):
        raise _handle_error(session_id or "", settings) from None
    except SessionBusy:
        raise ToolError(
            f"session {session_id!r} is running other code; wait for it to finish (one "
            "execution at a time per session)"
        ) from None
    except PoolExhausted as exc:
        raise ToolError(f"no capacity now: {exc}; retry in a few seconds") from None
    except (KernelStartError, FileOpTimeout) as exc:
        raise ToolError(f"the service could not do it now: {exc}") from None
    except (CodeTooLarge, FileTooLarge) as exc:
        raise ToolError(f"too large: {exc}") from None
    except UnsafePath as exc:
        raise ToolError(f"bad path: {exc}") from None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise ToolError(f"no such file: {exc.filename or exc}") from None


class _Progress:
    """Execute events as MCP progress notifications, sent by a task of their own so that a
    slow client never holds up the capture of the kernel's output (events are dropped past
    a small backlog; the result carries everything)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=64)
        self.count = 0

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind in ("stdout", "stderr"):
            message = f"{kind}: {data.get('text', '')}"
        elif kind == "error":
            message = f"error: {data.get('name', '')}: {data.get('value', '')}"
        else:
            message = kind
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(message[:PROGRESS_CHARS])

    async def send(self) -> None:
        while (message := await self.queue.get()) is not None:
            self.count += 1
            try:
                await self.ctx.report_progress(self.count, message=message)
            except Exception as exc:  # the client went away: the code still finishes
                log.debug("progress not sent: %r", exc)
                return

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self.send())
        try:
            yield
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)
            try:
                await asyncio.wait_for(task, timeout=5)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()


def execution_result(execution: Execution) -> CallToolResult:
    """Text (rendered), images, and the Execution itself as structured content."""
    content: list[ContentBlock] = [TextContent(type="text", text=execution.text or "")]
    for image in execution.images:
        if image.mime not in MODEL_IMAGES:
            continue
        encoded = image_base64(execution, image.path, image.mime)
        if encoded is not None:
            content.append(ImageContent(type="image", data=encoded, mime_type=image.mime))
    return CallToolResult(
        content=content, structured_content=execution.model_dump(mode="json"), is_error=False
    )


def build_server(application: Application) -> MCPServer:
    """The MCP server: its tools call `application` (the one made in the service's lifespan,
    looked up when a tool runs)."""
    server = MCPServer(
        name="kernelbox", version=__version__, instructions=INSTRUCTIONS, log_level="WARNING"
    )
    settings = application.settings

    @server.tool(
        description="Start a stateful Python session; returns its session_id, the handle "
        "run_code and the file tools take. Variables, imports and files persist in it until "
        "delete_session or until it goes unused for idle_timeout seconds.",
        annotations=ToolAnnotations(title="Create session", open_world_hint=False),
    )
    async def create_session(
        ctx: Context,
        idle_timeout: Annotated[
            float | None,
            Field(gt=0, description="Seconds unused before the session ends (capped)."),
        ] = None,
    ) -> dict[str, Any]:
        owner = _owner(ctx)
        with _tool_errors(None, settings):
            session = await application.create_session(
                owner, CreateSessionRequest(idle_timeout=idle_timeout)
            )
        return {"session_id": session.id, "expires_at": session.expires_at}

    @server.tool(
        description=TOOL_DESCRIPTION
        + " Pass session_id (from create_session) to keep state between calls; without it "
        "the code runs once in a fresh interpreter that is discarded afterwards.",
        annotations=ToolAnnotations(title="Run Python code", open_world_hint=False),
    )
    async def run_code(
        ctx: Context,
        code: Annotated[str, Field(description="The Python code to run.")],
        session_id: Annotated[
            str | None, Field(description="A handle from create_session; omit for a one-shot run.")
        ] = None,
        timeout: Annotated[
            float | None, Field(gt=0, description="Deadline in seconds (capped).")
        ] = None,
    ) -> Annotated[CallToolResult, Execution]:
        owner = _owner(ctx)
        request = ExecuteRequest(code=code, timeout=timeout, format="qwen")
        progress = _Progress(ctx)
        with _tool_errors(session_id, settings):
            async with progress.running():
                if session_id is None:
                    execution = await application.run_once(
                        owner, request, on_event=progress.on_event
                    )
                else:
                    execution = await application.execute(
                        session_id,
                        owner,
                        request,
                        base_url=_base_url(ctx, settings),
                        on_event=progress.on_event,
                    )
        return execution_result(execution)

    @server.tool(
        description="The files in a session's working directory (plots are saved in outputs/).",
        annotations=ToolAnnotations(title="List files", read_only_hint=True),
    )
    async def list_files(ctx: Context, session_id: SessionId) -> list[FileEntry]:
        owner = _owner(ctx)
        with _tool_errors(session_id, settings):
            listing = await application.files(session_id, owner).list()
        return [
            FileEntry(path=f.path, size=f.size, modified=datetime.fromtimestamp(f.modified, UTC))
            for f in listing.files
        ]

    @server.tool(
        description="Read a file of a session's working directory: text as text, PNG/JPEG as "
        f"an image, other bytes as base64 (at most {MAX_READ_BYTES // 1024**2} MiB).",
        annotations=ToolAnnotations(title="Read file", read_only_hint=True),
    )
    async def read_file(ctx: Context, session_id: SessionId, path: Path) -> list[ContentBlock]:
        owner = _owner(ctx)
        with _tool_errors(session_id, settings):
            size, body = await application.files(session_id, owner).stream(path)
            try:
                if size > MAX_READ_BYTES:
                    raise ToolError(
                        f"{path!r} is {size} bytes; read_file returns at most {MAX_READ_BYTES}"
                        " (use run_code to look at parts of it)"
                    )
                data = b"".join([chunk async for chunk in body])
            finally:
                await body.aclose()
        mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if mime in MODEL_IMAGES:
            encoded = base64.b64encode(data).decode()
            return [ImageContent(type="image", data=encoded, mime_type=mime)]
        try:
            return [TextContent(type="text", text=data.decode())]
        except UnicodeDecodeError:
            encoded = base64.b64encode(data).decode()
            return [TextContent(type="text", text=f"base64 ({mime}, {len(data)} bytes): {encoded}")]

    @server.tool(
        description="Write a file into a session's working directory (parent directories are "
        "made); the code sees it at that path.",
        annotations=ToolAnnotations(title="Write file", destructive_hint=True),
    )
    async def write_file(
        ctx: Context,
        session_id: SessionId,
        path: Path,
        content: Annotated[str, Field(description="The file's content.")],
        encoding: Annotated[
            str, Field(pattern="^(utf-8|base64)$", description="'utf-8' text or 'base64' bytes.")
        ] = "utf-8",
    ) -> FileEntry:
        owner = _owner(ctx)
        try:
            data = (
                base64.b64decode(content, validate=True)
                if encoding == "base64"
                else (content.encode())
            )
        except ValueError:
            raise ToolError("content is not valid base64") from None
        with _tool_errors(session_id, settings):
            target = application.files(session_id, owner)
            try:
                await target.write(path, data)
            except IsADirectoryError:
                raise ToolError(f"{path!r} is a directory") from None
        return FileEntry(path=path, size=len(data), modified=datetime.now(UTC))

    @server.tool(
        description="End a session: its interpreter stops and its files are removed; the "
        "handle is no longer valid.",
        annotations=ToolAnnotations(title="Delete session", destructive_hint=True),
    )
    async def delete_session(ctx: Context, session_id: SessionId) -> dict[str, Any]:
        owner = _owner(ctx)
        with _tool_errors(session_id, settings):
            await application.delete_session(session_id, owner)
        return {"deleted": session_id}

    return server


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """DNS-rebinding protection: the Host (and a browser's Origin) must name this service:
    loopback, the host it binds (unless a wildcard), the public URL's, or one of
    `mcp_allowed_hosts`."""
    hosts = ["127.0.0.1", "localhost", "[::1]"]
    if settings.host not in ("0.0.0.0", "::", ""):
        hosts.append(f"[{settings.host}]" if ":" in settings.host else settings.host)
    hosts += settings.mcp_allowed_hosts
    allowed_hosts = [f"{h}:*" for h in hosts] + hosts
    allowed_origins = [f"{s}://{h}" for h in hosts for s in ("http", "https")]
    allowed_origins += [f"{o}:*" for o in allowed_origins]
    if settings.public_url:
        public = urlsplit(settings.public_url)
        if public.netloc:
            allowed_hosts.append(public.netloc)
            allowed_origins.append(f"{public.scheme}://{public.netloc}")
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=allowed_hosts,
        allowed_origins=allowed_origins,
    )


class _Authenticated:
    """The service's API keys on every MCP HTTP request: 401 (with the service's error body)
    before the SDK reads it, else the owner id in the request's state for the tools."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            try:
                owner = authenticate(self.settings.api_key, key_from_header(header))
            except ApiError as exc:
                response = error_response(
                    exc.status, exc.code, exc.message, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})["kernelbox_owner"] = owner
        await self.app(scope, receive, send)


class McpEndpoint:
    """The MCP endpoint of one service instance: its routes to mount, and its session
    manager to run in the service's lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server: MCPServer | None = None
        self._handler: ASGIApp | None = None

    def start(self, application: Application) -> contextlib.AbstractAsyncContextManager[None]:
        """Build the server over `application` and run its session manager (the lifespan
        enters this)."""
        self.server = build_server(application)
        starlette_app = self.server.streamable_http_app(
            streamable_http_path=PATH,
            stateless_http=True,
            transport_security=transport_security(self.settings),
            max_request_body_size=self.settings.max_body_bytes,
        )
        (route,) = [r for r in starlette_app.routes if getattr(r, "path", None) == PATH]
        self._handler = route.app
        return self.server.session_manager.run()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._handler is None:
            response = error_response(503, "unavailable", "the service is starting")
            await response(scope, receive, send)
            return
        await self._handler(scope, receive, send)

    def route(self) -> Route:
        return Route(PATH, endpoint=_Authenticated(self, self.settings), include_in_schema=False)
