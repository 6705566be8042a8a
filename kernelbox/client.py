"""The synchronous client: `Client` and its `Session`s. `async_client.py` is its twin.

Every request, answer, error and retry decision comes from `_core`; this module only sends
with `httpx.Client` and sleeps with `time.sleep`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
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


class _Requester:
    """One httpx client plus the retry loop."""

    def __init__(self, http: httpx.Client, options: core.Options) -> None:
        self.http = http
        self.options = options

    def send(self, call: core.Call[T]) -> T:
        response = self._send(call, stream=False)
        return call.parse(response)

    def open_stream(self, call: core.Call[Any]) -> httpx.Response:
        return self._send(call, stream=True)

    def _send(self, call: core.Call[Any], stream: bool) -> httpx.Response:
        request = self.http.build_request(**call.request_kwargs())
        attempt = 0
        while True:
            try:
                response = self.http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self.options.retry.after_error(exc, attempt, call.idempotent)
                if delay is None:
                    raise core.transport_error(exc, request) from exc
            else:
                if response.is_success:
                    return response
                if stream:
                    response.read()
                    response.close()
                delay = self.options.retry.after_response(response, attempt)
                if delay is None:
                    raise core.api_error(response, call)
            time.sleep(delay)
            attempt += 1

    def close(self) -> None:
        self.http.close()


class ExecutionStream:
    """The events of one execution as they happen: iterate it (`for event in stream`).

    The request is sent when iteration starts. `execution` holds the result once the
    `EndEvent` arrived. Use it as a context manager (or iterate to the end) so the
    connection is released if you stop early.
    """

    def __init__(self, requester: _Requester, call: core.Call[Execution]) -> None:
        self._requester = requester
        self._call = call
        self._decoder = core.EventDecoder(url=f"{requester.options.base_url}{call.path}")
        self._events: Iterator[Event] | None = None

    @property
    def execution(self) -> Execution | None:
        return self._decoder.execution

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self._events is None:
            self._events = self._generate()
        return next(self._events)

    def _generate(self) -> Iterator[Event]:
        response = self._requester.open_stream(self._call)
        try:
            for line in response.iter_lines():
                yield from self._decoder.feed(line)
        except httpx.TransportError as exc:
            raise core.transport_error(exc, response.request) from exc
        finally:
            response.close()
        self._decoder.finish()

    def until_done(self) -> Execution:
        """Consume what is left; the final `Execution`."""
        for _ in self:
            pass
        return self._decoder.finish()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()  # type: ignore[attr-defined]

    def __enter__(self) -> ExecutionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _execute(
    requester: _Requester,
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
        with ExecutionStream(requester, call) as events:
            for event in events:
                callbacks.handle(event)
            execution = events.until_done()
    else:
        execution = requester.send(core.execute(options, session_id, code, timeout, format))
    return raise_for_execution(execution) if raise_on_error else execution


class Session:
    """A stateful session on the service: variables, imports and files persist between
    executions. As a context manager it deletes the session on exit.

    Each session talks over a connection of its own, so that many sessions used at once do
    not queue in one connection pool.
    """

    def __init__(self, client: Client, info: SessionInfo) -> None:
        self._client = client
        self.info = info
        self._requester: _Requester | None = None

    @property
    def id(self) -> str:
        return self.info.id

    def __repr__(self) -> str:
        return f"<Session {self.id} status={self.info.status}>"

    @property
    def _http(self) -> _Requester:
        if self._requester is None:
            self._requester = self._client._open_requester()
        return self._requester

    def refresh(self) -> SessionInfo:
        """Fetch the session's current status, counts and expiry into `info`."""
        self.info = self._http.send(core.get_session(self.id))
        return self.info

    def execute(
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
        """Run `code` with a deadline of `timeout` seconds (the service's default if None).

        The code's own errors, a deadline and a dead kernel are in the returned `Execution`
        (`status`); with `raise_on_error=True` they raise `ExecutionError`,
        `ExecutionTimeout`, `KernelDied` instead. With any `on_*` callback the execution is
        streamed and the callbacks see output as it arrives. `format` also renders it into
        `Execution.text` on the service.
        """
        callbacks = core.Callbacks(on_stdout, on_stderr, on_result, on_error)
        return _execute(self._http, self.id, code, timeout, format, raise_on_error, callbacks)

    def stream(
        self, code: str, timeout: float | None = None, *, format: Format | None = None
    ) -> ExecutionStream:
        """Run `code` and iterate its events (`StdoutEvent`, ..., then `EndEvent`)."""
        return ExecutionStream(
            self._http, core.execute(self._http.options, self.id, code, timeout, format, True)
        )

    def interrupt(self) -> bool:
        """Interrupt running code (like Ctrl-C); False when nothing was running."""
        return self._http.send(core.interrupt(self.id))

    def restart(self) -> SessionInfo:
        """A fresh kernel: variables are lost, files are kept."""
        self.info = self._http.send(core.restart(self.id))
        return self.info

    def pause(self) -> SessionInfo:
        """Free the kernel, keeping variables and files; the next execute resumes it (its
        Execution's `not_restored` names what could not be restored, and why)."""
        self.info = self._http.send(core.pause(self.id))
        return self.info

    def run_tool_call(
        self, tool_call: Any, *, format: Format | None = "openai", timeout: float | None = None
    ) -> dict[str, Any] | str:
        """Run an OpenAI tool call of `code_interpreter` here; the tool message to append."""
        call = core.tool_call(self._http.options, self.id, tool_call, format, timeout)
        return self._http.send(call).message

    # -- files -----------------------------------------------------------------------------

    def list_files(self) -> list[FileEntry]:
        return self._http.send(core.list_files(self.id))

    def upload(self, source: core.FileSource, path: str | None = None) -> FileEntry:
        """Write a file into the session: `source` is bytes (then `path` is needed), a local
        path, or a binary file object; `path` is relative to the working directory."""
        return self._http.send(core.upload(self.id, source, path))

    def download(self, path: str | Image) -> bytes:
        """A file's bytes; `path` may be an `Image` of an execution."""
        return self._http.send(core.download(self.id, path))

    def download_to(self, path: str | Image, dest: str | os.PathLike[str] | None = None) -> Path:
        """Save a file (or an `Image`) locally: to `dest`, into `dest` if it is a directory,
        or under its own name in the current directory. Returns where it went."""
        return core.write_local(core.local_target(path, dest), self.download(path))

    def save_images(
        self, execution: Execution, directory: str | os.PathLike[str] = "."
    ) -> list[Path]:
        """Save every image of `execution` into `directory`; their local paths."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        return [self.download_to(image, directory) for image in execution.images]

    def notebook(self) -> dict[str, Any]:
        """The session's history as a Jupyter notebook (nbformat 4, as JSON): each execution
        a code cell with its outputs and images, in order."""
        return self._http.send(core.notebook(self.id))

    def save_notebook(self, dest: str | os.PathLike[str]) -> Path:
        """Save the session's history as an `.ipynb` at `dest`; returns the path."""
        return core.write_local(Path(dest), core.notebook_bytes(self.notebook()))

    def delete_file(self, path: str) -> None:
        self._http.send(core.delete_file(self.id, path))

    # -- lifetime --------------------------------------------------------------------------

    def delete(self) -> None:
        """Delete the session on the service (its kernel and files) and release the
        connection. Deleting a session that is already gone is not an error."""
        # A handle that never ran anything has no connection of its own: no need for one.
        requester = self._requester or self._client._shared
        try:
            requester.send(core.delete_session(self.id))
        except SessionNotFound:
            pass
        finally:
            self.close()

    def close(self) -> None:
        """Release this handle's connection; the session itself lives on."""
        if self._requester is not None:
            self._client._release_requester(self._requester)
            self._requester = None

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()


class Client:
    """A client of a kernelbox service.

    `base_url` and `api_key` default to `KERNELBOX_URL` (else http://127.0.0.1:8000) and
    `KERNELBOX_API_KEY`. `timeout` bounds ordinary requests; executions wait for their
    deadline plus a margin. Answers 429/503 (and connection failures where that is safe)
    are retried up to `max_retries` times, waiting as `Retry-After` says, at most
    `max_retry_wait` seconds each time.
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
        # One SSL context for every connection: building one costs milliseconds.
        self._ssl = httpx.create_ssl_context()
        self._shared = _Requester(
            httpx.Client(**self._options.httpx_kwargs(self._ssl)), self._options
        )
        self._session_requesters: set[_Requester] = set()
        self._lock = threading.Lock()
        self._tool_lock = threading.Lock()
        self._tool_session_id: str | None = None
        self._closed = False

    @property
    def base_url(self) -> str:
        return self._options.base_url

    def __repr__(self) -> str:
        return f"<Client {self.base_url}>"

    # -- sessions ----------------------------------------------------------------------------

    def create_session(
        self,
        *,
        idle_timeout: float | None = None,
        env: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        """A new session from the service's warm pool; `with` it to delete it at the end."""
        info = self._shared.send(core.create_session(idle_timeout, env, metadata))
        return Session(self, info)

    def get_session(self, session_id: str) -> Session:
        """A handle on an existing session (`SessionNotFound` if there is none)."""
        return Session(self, self._shared.send(core.get_session(session_id)))

    def list_sessions(self) -> list[SessionInfo]:
        """The sessions of this API key."""
        return self._shared.send(core.list_sessions())

    def delete_session(self, session_id: str) -> None:
        self._shared.send(core.delete_session(session_id))

    # -- one-shot runs and tools -------------------------------------------------------------

    def execute(
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
        """Run `code` once in a fresh interpreter (no session, nothing kept); images come
        back as data URLs. Arguments as for `Session.execute`."""
        callbacks = core.Callbacks(on_stdout, on_stderr, on_result, on_error)
        return _execute(self._shared, None, code, timeout, format, raise_on_error, callbacks)

    def stream(
        self, code: str, timeout: float | None = None, *, format: Format | None = None
    ) -> ExecutionStream:
        """A one-shot run's events, as `Session.stream`."""
        return ExecutionStream(
            self._shared, core.execute(self._options, None, code, timeout, format, True)
        )

    def tools(self) -> list[dict[str, Any]]:
        """The service's OpenAI tools schema (`kernelbox.CODE_INTERPRETER_TOOL` locally)."""
        return self._shared.send(core.tools())

    @property
    def tool_session_id(self) -> str | None:
        """The session `run_tool_call` keeps when none is given (made on the first call)."""
        return self._tool_session_id

    def run_tool_call(
        self,
        tool_call: Any,
        *,
        session: Session | str | None = None,
        format: Format | None = "openai",
        timeout: float | None = None,
    ) -> dict[str, Any] | str:
        """Run an OpenAI tool call of `code_interpreter` (the SDK's object or a dict);
        returns the tool message to append to the conversation.

        Without `session`, every call goes to one session this client keeps (created on
        the first call, deleted by `close()`), so variables persist between calls.
        """
        if isinstance(session, Session):
            return session.run_tool_call(tool_call, format=format, timeout=timeout)
        if session is not None:
            call = core.tool_call(self._options, session, tool_call, format, timeout)
            return self._shared.send(call).message
        # One call at a time: the kept session runs one execution at a time anyway.
        with self._tool_lock:
            call = core.tool_call(self._options, self._tool_session_id, tool_call, format, timeout)
            answer = self._shared.send(call)
            self._tool_session_id = answer.session_id
        return answer.message

    def run_tool_calls(
        self,
        tool_calls: Iterable[Any],
        *,
        session: Session | str | None = None,
        format: Format | None = "openai",
        timeout: float | None = None,
    ) -> list[dict[str, Any] | str]:
        """`run_tool_call` for each call of an assistant message, in order."""
        return [
            self.run_tool_call(c, session=session, format=format, timeout=timeout)
            for c in tool_calls
        ]

    # -- lifetime ----------------------------------------------------------------------------

    def _open_requester(self) -> _Requester:
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            kwargs = self._options.httpx_kwargs(self._ssl, keepalive=2)
            requester = _Requester(httpx.Client(**kwargs), self._options)
            self._session_requesters.add(requester)
            return requester

    def _release_requester(self, requester: _Requester) -> None:
        with self._lock:
            self._session_requesters.discard(requester)
        requester.close()

    def close(self) -> None:
        """Delete the session `run_tool_call` kept and close every connection (sessions made
        by `create_session` live on until deleted or expired)."""
        if self._tool_session_id is not None:
            try:
                self._shared.send(core.delete_session(self._tool_session_id))
            except Exception:
                pass  # best effort: it expires on its own
            self._tool_session_id = None
        with self._lock:
            self._closed = True
            requesters = list(self._session_requesters)
            self._session_requesters.clear()
        for requester in requesters:
            requester.close()
        self._shared.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
