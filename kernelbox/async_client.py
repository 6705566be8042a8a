"""The asynchronous client: `AsyncClient` and its `AsyncSession`s, the twin of `client.py`.

Every request, answer, error and retry decision comes from `_core`; this module only sends
with `httpx.AsyncClient` and sleeps with `asyncio.sleep`. Callbacks may be plain functions
or coroutine functions.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from kernelbox_wire.events import Event
from kernelbox_wire.models import ErrorInfo, Execution, FileEntry, Format, Image, Result
from kernelbox_wire.models import Session as SessionInfo

from . import _core as core
from .errors import SessionNotFound, raise_for_execution

T = TypeVar("T")


class _AsyncRequester:
    """One httpx client plus the retry loop."""

    def __init__(self, http: httpx.AsyncClient, options: core.Options) -> None:
        self.http = http
        self.options = options

    async def send(self, call: core.Call[T]) -> T:
        response = await self._send(call, stream=False)
        return call.parse(response)

    async def open_stream(self, call: core.Call[Any]) -> httpx.Response:
        return await self._send(call, stream=True)

    async def _send(self, call: core.Call[Any], stream: bool) -> httpx.Response:
        request = self.http.build_request(**call.request_kwargs())
        attempt = 0
        while True:
            try:
                response = await self.http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self.options.retry.after_error(exc, attempt, call.idempotent)
                if delay is None:
                    raise core.transport_error(exc, request) from exc
            else:
                if response.is_success:
                    return response
                if stream:
                    await response.aread()
                    await response.aclose()
                delay = self.options.retry.after_response(response, attempt)
                if delay is None:
                    raise core.api_error(response, call)
            await asyncio.sleep(delay)
            attempt += 1

    async def aclose(self) -> None:
        await self.http.aclose()


class AsyncExecutionStream:
    """The events of one execution as they happen: `async for event in stream`.

    The request is sent when iteration starts. `execution` holds the result once the
    `EndEvent` arrived. Use `async with` (or iterate to the end) so the connection is
    released if you stop early.
    """

    def __init__(self, requester: _AsyncRequester, call: core.Call[Execution]) -> None:
        self._requester = requester
        self._call = call
        self._decoder = core.EventDecoder(url=f"{requester.options.base_url}{call.path}")
        self._events: AsyncIterator[Event] | None = None

    @property
    def execution(self) -> Execution | None:
        return self._decoder.execution

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._events is None:
            self._events = self._generate()
        return await anext(self._events)

    async def _generate(self) -> AsyncIterator[Event]:
        response = await self._requester.open_stream(self._call)
        try:
            async for line in response.aiter_lines():
                for event in self._decoder.feed(line):
                    yield event
        except httpx.TransportError as exc:
            raise core.transport_error(exc, response.request) from exc
        finally:
            await response.aclose()
        self._decoder.finish()

    async def until_done(self) -> Execution:
        """Consume what is left; the final `Execution`."""
        async for _ in self:
            pass
        return self._decoder.finish()

    async def aclose(self) -> None:
        if self._events is not None:
            await self._events.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> AsyncExecutionStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _execute(
    requester: _AsyncRequester,
    session_id: str | None,
    code: str,
    timeout: float | None,
    format: Format | None,
    raise_on_error: bool,
    callbacks: core.Callbacks,
) -> Execution:
    options = requester.options
    if callbacks:
        call = core.execute(options, session_id, code, timeout, format, stream=True)
        async with AsyncExecutionStream(requester, call) as events:
            async for event in events:
                handled = callbacks.handle(event)
                if inspect.isawaitable(handled):
                    await handled
            execution = await events.until_done()
    else:
        execution = await requester.send(core.execute(options, session_id, code, timeout, format))
    return raise_for_execution(execution) if raise_on_error else execution


class AsyncSession:
    """A stateful session on the service: variables, imports and files persist between
    executions. As an async context manager it deletes the session on exit.

    Each session talks over a connection of its own: one httpx pool shared by many
    concurrent sessions costs more per request the more connections it holds
    (encode/httpx#3215), which is what 64-256 concurrent RL rollouts would hit.
    """

    def __init__(self, client: AsyncClient, info: SessionInfo) -> None:
        self._client = client
        self.info = info
        self._requester: _AsyncRequester | None = None

    @property
    def id(self) -> str:
        return self.info.id

    def __repr__(self) -> str:
        return f"<AsyncSession {self.id} status={self.info.status}>"

    @property
    def _http(self) -> _AsyncRequester:
        if self._requester is None:
            self._requester = self._client._open_requester()
        return self._requester

    async def refresh(self) -> SessionInfo:
        """Fetch the session's current status, counts and expiry into `info`."""
        self.info = await self._http.send(core.get_session(self.id))
        return self.info

    async def execute(
        self,
        code: str,
        timeout: float | None = None,
        *,
        format: Format | None = None,
        raise_on_error: bool = False,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        on_result: Callable[[Result], Any] | None = None,
        on_error: Callable[[ErrorInfo], Any] | None = None,
    ) -> Execution:
        """Run `code` with a deadline of `timeout` seconds; as `Session.execute`."""
        callbacks = core.Callbacks(on_stdout, on_stderr, on_result, on_error)
        return await _execute(self._http, self.id, code, timeout, format, raise_on_error, callbacks)

    def stream(
        self, code: str, timeout: float | None = None, *, format: Format | None = None
    ) -> AsyncExecutionStream:
        """Run `code` and iterate its events: `async for event in session.stream(code)`."""
        return AsyncExecutionStream(
            self._http, core.execute(self._http.options, self.id, code, timeout, format, True)
        )

    async def interrupt(self) -> bool:
        """Interrupt running code (like Ctrl-C); False when nothing was running."""
        return await self._http.send(core.interrupt(self.id))

    async def restart(self) -> SessionInfo:
        """A fresh kernel: variables are lost, files are kept."""
        self.info = await self._http.send(core.restart(self.id))
        return self.info

    async def pause(self) -> SessionInfo:
        """Free the kernel, keeping variables and files; as `Session.pause`."""
        self.info = await self._http.send(core.pause(self.id))
        return self.info

    async def run_tool_call(
        self, tool_call: Any, *, format: Format | None = "openai", timeout: float | None = None
    ) -> dict[str, Any] | str:
        """Run an OpenAI tool call of `code_interpreter` here; the tool message to append."""
        call = core.tool_call(self._http.options, self.id, tool_call, format, timeout)
        return (await self._http.send(call)).message

    # -- files -----------------------------------------------------------------------------

    async def list_files(self) -> list[FileEntry]:
        return await self._http.send(core.list_files(self.id))

    async def upload(self, source: core.FileSource, path: str | None = None) -> FileEntry:
        """Write a file into the session; as `Session.upload`."""
        return await self._http.send(core.upload(self.id, source, path))

    async def download(self, path: str | Image) -> bytes:
        """A file's bytes; `path` may be an `Image` of an execution."""
        return await self._http.send(core.download(self.id, path))

    async def download_to(
        self, path: str | Image, dest: str | os.PathLike[str] | None = None
    ) -> Path:
        """Save a file (or an `Image`) locally; as `Session.download_to`."""
        return core.write_local(core.local_target(path, dest), await self.download(path))

    async def save_images(
        self, execution: Execution, directory: str | os.PathLike[str] = "."
    ) -> list[Path]:
        """Save every image of `execution` into `directory`; their local paths."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        return [await self.download_to(image, directory) for image in execution.images]

    async def notebook(self) -> dict[str, Any]:
        """The session's history as a Jupyter notebook; as `Session.notebook`."""
        return await self._http.send(core.notebook(self.id))

    async def save_notebook(self, dest: str | os.PathLike[str]) -> Path:
        """Save the session's history as an `.ipynb` at `dest`; returns the path."""
        return core.write_local(Path(dest), core.notebook_bytes(await self.notebook()))

    async def delete_file(self, path: str) -> None:
        await self._http.send(core.delete_file(self.id, path))

    # -- lifetime --------------------------------------------------------------------------

    async def delete(self) -> None:
        """Delete the session on the service (its kernel and files) and release the
        connection. Deleting a session that is already gone is not an error."""
        requester = self._requester or self._client._shared
        try:
            await requester.send(core.delete_session(self.id))
        except SessionNotFound:
            pass
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Release this handle's connection; the session itself lives on."""
        if self._requester is not None:
            requester, self._requester = self._requester, None
            await self._client._release_requester(requester)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.delete()


class AsyncClient:
    """The async client of a kernelbox service; arguments as for `Client`.

    Built for many concurrent sessions from one client: each `AsyncSession` has a
    connection of its own (all sharing one SSL context), so 64-256 concurrent sessions do
    not contend in one pool.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._options = core.Options.resolve(
            base_url, api_key, timeout, max_retries, max_retry_wait, headers
        )
        self._ssl = httpx.create_ssl_context()
        self._shared = _AsyncRequester(
            httpx.AsyncClient(**self._options.httpx_kwargs(self._ssl)), self._options
        )
        self._session_requesters: set[_AsyncRequester] = set()
        self._tool_lock = asyncio.Lock()
        self._tool_session_id: str | None = None
        self._closed = False

    @property
    def base_url(self) -> str:
        return self._options.base_url

    def __repr__(self) -> str:
        return f"<AsyncClient {self.base_url}>"

    # -- sessions ----------------------------------------------------------------------------

    async def create_session(
        self,
        *,
        idle_timeout: float | None = None,
        env: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> AsyncSession:
        """A new session from the service's warm pool; `async with` it to delete it."""
        info = await self._shared.send(core.create_session(idle_timeout, env, metadata))
        return AsyncSession(self, info)

    async def get_session(self, session_id: str) -> AsyncSession:
        """A handle on an existing session (`SessionNotFound` if there is none)."""
        return AsyncSession(self, await self._shared.send(core.get_session(session_id)))

    async def list_sessions(self) -> list[SessionInfo]:
        """The sessions of this API key."""
        return await self._shared.send(core.list_sessions())

    async def delete_session(self, session_id: str) -> None:
        await self._shared.send(core.delete_session(session_id))

    # -- one-shot runs and tools -------------------------------------------------------------

    async def execute(
        self,
        code: str,
        timeout: float | None = None,
        *,
        format: Format | None = None,
        raise_on_error: bool = False,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        on_result: Callable[[Result], Any] | None = None,
        on_error: Callable[[ErrorInfo], Any] | None = None,
    ) -> Execution:
        """Run `code` once in a fresh interpreter; as `Client.execute`."""
        callbacks = core.Callbacks(on_stdout, on_stderr, on_result, on_error)
        return await _execute(self._shared, None, code, timeout, format, raise_on_error, callbacks)

    def stream(
        self, code: str, timeout: float | None = None, *, format: Format | None = None
    ) -> AsyncExecutionStream:
        """A one-shot run's events, as `AsyncSession.stream`."""
        return AsyncExecutionStream(
            self._shared, core.execute(self._options, None, code, timeout, format, True)
        )

    async def tools(self) -> list[dict[str, Any]]:
        """The service's OpenAI tools schema (`kernelbox.CODE_INTERPRETER_TOOL` locally)."""
        return await self._shared.send(core.tools())

    @property
    def tool_session_id(self) -> str | None:
        """The session `run_tool_call` keeps when none is given (made on the first call)."""
        return self._tool_session_id

    async def run_tool_call(
        self,
        tool_call: Any,
        *,
        session: AsyncSession | str | None = None,
        format: Format | None = "openai",
        timeout: float | None = None,
    ) -> dict[str, Any] | str:
        """Run an OpenAI tool call; as `Client.run_tool_call`."""
        if isinstance(session, AsyncSession):
            return await session.run_tool_call(tool_call, format=format, timeout=timeout)
        if session is not None:
            call = core.tool_call(self._options, session, tool_call, format, timeout)
            return (await self._shared.send(call)).message
        async with self._tool_lock:
            call = core.tool_call(self._options, self._tool_session_id, tool_call, format, timeout)
            answer = await self._shared.send(call)
            self._tool_session_id = answer.session_id
        return answer.message

    async def run_tool_calls(
        self,
        tool_calls: Iterable[Any],
        *,
        session: AsyncSession | str | None = None,
        format: Format | None = "openai",
        timeout: float | None = None,
    ) -> list[dict[str, Any] | str]:
        """`run_tool_call` for each call of an assistant message, in order."""
        return [
            await self.run_tool_call(c, session=session, format=format, timeout=timeout)
            for c in tool_calls
        ]

    # -- lifetime ----------------------------------------------------------------------------

    def _open_requester(self) -> _AsyncRequester:
        if self._closed:
            raise RuntimeError("the client is closed")
        kwargs = self._options.httpx_kwargs(self._ssl, keepalive=2)
        requester = _AsyncRequester(httpx.AsyncClient(**kwargs), self._options)
        self._session_requesters.add(requester)
        return requester

    async def _release_requester(self, requester: _AsyncRequester) -> None:
        self._session_requesters.discard(requester)
        await requester.aclose()

    async def aclose(self) -> None:
        """Delete the session `run_tool_call` kept and close every connection (sessions made
        by `create_session` live on until deleted or expired)."""
        if self._tool_session_id is not None:
            try:
                await self._shared.send(core.delete_session(self._tool_session_id))
            except Exception:
                pass  # best effort: it expires on its own
            self._tool_session_id = None
        self._closed = True
        requesters = list(self._session_requesters)
        self._session_requesters.clear()
        for requester in requesters:
            await requester.aclose()
        await self._shared.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
