"""What the sync and async clients share: configuration, the request of every operation, the
parsing of its answer, error mapping, the retry policy, and the SSE decoder.

The clients only move bytes (`httpx.Client` or `httpx.AsyncClient`) and sleep; every decision
is made here, once, so the two cannot drift apart. Only httpx and pydantic are needed.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter

from kernelbox_wire.events import EndEvent, ErrorEvent, Event, ResultEvent, StderrEvent, StdoutEvent
from kernelbox_wire.models import (
    ErrorInfo,
    Execution,
    FileEntry,
    Format,
    Image,
    Result,
    Session,
    ToolCallResponse,
)
from kernelbox_wire.tools import TOOL_NAME

from . import errors

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
# Without an explicit deadline the service applies its own default, at most its
# `max_timeout` (600 s unless the operator raised it); the HTTP read waits that long.
SERVICE_MAX_DEADLINE = 600.0
# On top of the deadline: the interrupt grace period, a restart, and the way back.
DEADLINE_MARGIN = 30.0
USER_AGENT = "kernelbox-python"
KEEPALIVE_EXPIRY = 4.0

FileSource = bytes | bytearray | memoryview | str | os.PathLike[str] | IO[bytes]


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with exponential backoff (jittered), honouring `Retry-After`.

    Answers 429 and 503 are retried for every request: the service refused it, nothing ran.
    Transport errors are retried when the request cannot have reached the service (the
    connection was refused or never made), and otherwise only for idempotent requests:
    an execute whose answer was lost may have run, and must not run twice.
    """

    max_retries: int = 3
    max_wait: float = 30.0
    backoff: float = 0.5

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry number `attempt + 1`, or None to give up."""
        if attempt >= self.max_retries:
            return None
        if retry_after is not None:
            wait = retry_after
        else:
            wait = self.backoff * 2**attempt * (0.5 + random.random() / 2)
        return max(0.0, min(wait, self.max_wait))

    def after_response(self, response: httpx.Response, attempt: int) -> float | None:
        if response.status_code not in (429, 503):
            return None
        return self.delay(attempt, retry_after(response))

    def after_error(
        self, exc: httpx.TransportError, attempt: int, idempotent: bool
    ) -> float | None:
        if isinstance(exc, NOT_SENT) or idempotent:
            return self.delay(attempt)
        return None


# The request never left: safe to send again whatever it does.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class Options:
    base_url: str
    api_key: str | None
    timeout: float
    retry: RetryPolicy
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def resolve(
        cls,
        base_url: str | None,
        api_key: str | None,
        timeout: float,
        max_retries: int,
        max_retry_wait: float,
        headers: Mapping[str, str] | None,
    ) -> Options:
        url = base_url or os.environ.get("KERNELBOX_URL") or DEFAULT_URL
        if api_key is None:
            api_key = os.environ.get("KERNELBOX_API_KEY") or None
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        return cls(
            base_url=url.rstrip("/"),
            api_key=api_key,
            timeout=timeout,
            retry=RetryPolicy(max_retries=max_retries, max_wait=max_retry_wait),
            headers=dict(headers or {}),
        )

    def httpx_kwargs(self, verify: Any, keepalive: int | None = None) -> dict[str, Any]:
        """Arguments for `httpx.Client` / `httpx.AsyncClient` (same for both)."""
        headers = {"User-Agent": USER_AGENT, **self.headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        kwargs: dict[str, Any] = {
            "base_url": self.base_url,
            "headers": headers,
            "timeout": self.timeout,
            "verify": verify,
        }
        # An idle connection is dropped before the service would close it (uvicorn: after 5 s),
        # so an execute is never sent on a connection the server is closing at that moment.
        kwargs["limits"] = httpx.Limits(
            max_keepalive_connections=keepalive if keepalive is not None else 20,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        )
        return kwargs

    def execution_timeout(self, deadline: float | None) -> httpx.Timeout:
        """The HTTP read must outlast the execution deadline, or the client would cut it."""
        wait = (deadline if deadline is not None else SERVICE_MAX_DEADLINE) + DEADLINE_MARGIN
        return httpx.Timeout(self.timeout, read=max(self.timeout, wait))


# -- one operation: its request and the parsing of its answer ---------------------------------


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    content: bytes | None = None
    timeout: httpx.Timeout | None = None
    idempotent: bool = True
    # Which 404 this route means: "session", "file" (a file route), or "" (plain NotFound).
    not_found: str = "session"

    def request_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"method": self.method, "url": self.path}
        if self.json is not None:
            kwargs["json"] = self.json
        if self.content is not None:
            kwargs["content"] = self.content
            kwargs["headers"] = {"Content-Type": "application/octet-stream"}
        if self.timeout is not None:
            kwargs["timeout"] = self.timeout
        return kwargs


def _model(adapter: TypeAdapter[T]) -> Callable[[httpx.Response], T]:
    return lambda response: adapter.validate_json(response.content)


_SESSION = TypeAdapter(Session)
_SESSIONS = TypeAdapter(list[Session])
_EXECUTION = TypeAdapter(Execution)
_FILE = TypeAdapter(FileEntry)
_FILES = TypeAdapter(list[FileEntry])
_TOOL_RESPONSE = TypeAdapter(ToolCallResponse)
_TOOLS = TypeAdapter(list[dict[str, Any]])


def _none(_: httpx.Response) -> None:
    return None


def _bytes(response: httpx.Response) -> bytes:
    return response.content


def session_path(session_id: str) -> str:
    return f"/v1/sessions/{quote(session_id, safe='')}"


def file_path(session_id: str, path: str | Image) -> str:
    path = remote_path(path)
    # `.` and `..` are escaped so that the URL is not normalised into another route: the
    # service sees the path as given, and refuses what leads out of the working directory.
    segments = [
        "%2E" * len(part) if part in (".", "..") else quote(part, safe="")
        for part in path.split("/")
    ]
    return f"{session_path(session_id)}/files/{'/'.join(segments)}"


def _drop_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _format(fmt: Format | None) -> Any:
    return fmt.model_dump() if hasattr(fmt, "model_dump") else fmt  # type: ignore[union-attr]


def create_session(
    idle_timeout: float | None, env: dict[str, str] | None, metadata: dict[str, Any] | None
) -> Call[Session]:
    body = _drop_none(idle_timeout=idle_timeout, env=env, metadata=metadata)
    # Not idempotent: a create whose answer was lost would leave a session nobody knows of.
    return Call("POST", "/v1/sessions", _model(_SESSION), json=body, idempotent=False)


def get_session(session_id: str) -> Call[Session]:
    return Call("GET", session_path(session_id), _model(_SESSION))


def list_sessions() -> Call[list[Session]]:
    return Call("GET", "/v1/sessions", _model(_SESSIONS))


def delete_session(session_id: str) -> Call[None]:
    return Call("DELETE", session_path(session_id), _none)


def execute(
    options: Options,
    session_id: str | None,
    code: str,
    timeout: float | None,
    fmt: Format | None,
    stream: bool = False,
) -> Call[Execution]:
    """`session_id=None`: the one-shot, stateless `/v1/execute`."""
    path = "/v1/execute" if session_id is None else f"{session_path(session_id)}/execute"
    body = _drop_none(code=code, timeout=timeout, format=_format(fmt))
    if stream:
        body["stream"] = True
    return Call(
        "POST",
        path,
        _model(_EXECUTION),
        json=body,
        timeout=options.execution_timeout(timeout),
        idempotent=False,
    )


def interrupt(session_id: str) -> Call[bool]:
    return Call(
        "POST",
        f"{session_path(session_id)}/interrupt",
        lambda r: bool(r.json().get("interrupted")),
    )


def pause(session_id: str) -> Call[Session]:
    return Call("POST", f"{session_path(session_id)}/pause", _model(_SESSION))


def restart(session_id: str) -> Call[Session]:
    # Idempotent enough: a second restart of a fresh kernel loses nothing more.
    return Call("POST", f"{session_path(session_id)}/restart", _model(_SESSION))


def list_files(session_id: str) -> Call[list[FileEntry]]:
    return Call("GET", f"{session_path(session_id)}/files", _model(_FILES))


def upload(session_id: str, source: FileSource, path: str | None) -> Call[FileEntry]:
    data, path = read_source(source, path)
    return Call("PUT", file_path(session_id, path), _model(_FILE), content=data, not_found="file")


def download(session_id: str, path: str | Image) -> Call[bytes]:
    return Call("GET", file_path(session_id, path), _bytes, not_found="file")


def notebook(session_id: str) -> Call[dict[str, Any]]:
    return Call("GET", f"{session_path(session_id)}/notebook", lambda r: r.json())


def notebook_bytes(notebook: dict[str, Any]) -> bytes:
    """A notebook as an .ipynb file holds it (nbformat writes one-space indents)."""
    return (json.dumps(notebook, indent=1, ensure_ascii=False) + "\n").encode()


def delete_file(session_id: str, path: str) -> Call[None]:
    return Call("DELETE", file_path(session_id, path), _none, not_found="file")


def tools() -> Call[list[dict[str, Any]]]:
    return Call("GET", "/v1/tools", _model(_TOOLS), not_found="")


def tool_call(
    options: Options,
    session_id: str | None,
    tool_call: Any,
    fmt: Format | None,
    timeout: float | None,
) -> Call[ToolCallResponse]:
    call_id, arguments = tool_call_parts(tool_call)
    body = _drop_none(
        session_id=session_id,
        arguments=arguments,
        tool_call_id=call_id,
        format=_format(fmt),
        timeout=timeout,
    )
    return Call(
        "POST",
        f"/v1/tools/{TOOL_NAME}",
        _model(_TOOL_RESPONSE),
        json=body,
        timeout=options.execution_timeout(timeout),
        idempotent=False,
    )


# -- errors -----------------------------------------------------------------------------------


def retry_after(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (either form: a number or an HTTP date), if given."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def api_error(response: httpx.Response, call: Call[Any]) -> errors.APIError:
    """The exception for an error answer, from the service's `{"error": {...}}` body."""
    status = response.status_code
    code, message, fields = _error_body(response)
    cls = errors.error_class(status)
    if cls is errors.NotFound:
        if call.not_found == "session":
            cls = errors.SessionNotFound
        elif call.not_found == "file":
            # The file routes answer 404 both for the session and for the file.
            missing_file = message.startswith("no file")
            cls = errors.FileNotFound if missing_file else errors.SessionNotFound
    return cls(
        message,
        status=status,
        code=code,
        fields=fields,
        retry_after=retry_after(response),
        method=response.request.method,
        url=str(response.request.url),
    )


def _error_body(response: httpx.Response) -> tuple[str, str, list[dict[str, Any]] | None]:
    try:
        detail = response.json()["error"]
        return str(detail["code"]), str(detail["message"]), detail.get("fields")
    except (ValueError, KeyError, TypeError):
        # Not the service's error body (a proxy in between, an older server): keep the text.
        text = response.text.strip()[:500] or response.reason_phrase
        return "http_error", text, None


def transport_error(exc: httpx.TransportError, request: httpx.Request) -> errors.KernelboxError:
    """A transport failure as an SDK exception that names the URL that failed."""
    url = str(request.url)
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, NOT_SENT):
        read = (request.extensions.get("timeout") or {}).get("read")
        within = f" within {read:g} s" if isinstance(read, (int, float)) else ""
        return errors.RequestTimeout(
            f"no answer from {request.method} {url}{within} ({exc.__class__.__name__})", url=url
        )
    if isinstance(exc, NOT_SENT):
        base = f"{request.url.scheme}://{request.url.netloc.decode()}"
        detail = str(exc) or exc.__class__.__name__
        return errors.ConnectionError(
            f"cannot connect to the kernelbox service at {base} ({request.method} {url}): {detail}",
            url=url,
        )
    detail = str(exc) or exc.__class__.__name__
    return errors.ConnectionError(
        f"the connection to {url} failed during {request.method}: {detail}", url=url
    )


# -- server-sent events -----------------------------------------------------------------------


class SSEParser:
    """The parts of the SSE format this service uses: `event:` and `data:` fields, comments,
    and a blank line that ends an event. Feed it lines without their line ending."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            event, data = self._event or "message", self._data
            self._event, self._data = "", []
            return (event, "\n".join(data)) if data else None
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None  # `id` and `retry` mean nothing for a stream that is never resumed


class EventDecoder:
    """SSE lines of an execute stream in, typed events out; `execution` once it ended."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.execution: Execution | None = None
        self._sse = SSEParser()
        self._last_error: ErrorInfo | None = None

    def feed(self, line: str) -> list[Event]:
        item = self._sse.feed(line)
        if item is None:
            return []
        kind, data = item
        if kind == "fail":
            detail = json.loads(data).get("error", {})
            raise errors.APIError(
                str(detail.get("message", "the execution failed")),
                code=str(detail.get("code", "error")),
                url=self.url,
            )
        if kind not in ("stdout", "stderr", "result", "error", "end"):
            return []  # a newer service's event this client does not know
        payload = json.loads(data)
        if kind == "stdout":
            return [StdoutEvent(text=payload["text"])]
        if kind == "stderr":
            return [StderrEvent(text=payload["text"])]
        if kind == "result":
            return [ResultEvent(result=Result.model_validate(payload))]
        if kind == "error":
            self._last_error = ErrorInfo.model_validate(payload)
            return [ErrorEvent(error=self._last_error)]
        execution = Execution.model_validate(payload)
        self.execution = execution
        events: list[Event] = []
        if execution.error is not None and execution.error != self._last_error:
            # A deadline or a dead kernel is only known now: report it like any error.
            events.append(ErrorEvent(error=execution.error))
        events.append(EndEvent(execution=execution))
        return events

    def finish(self) -> Execution:
        if self.execution is None:
            raise errors.ConnectionError(
                f"the event stream from {self.url} ended before the execution did", url=self.url
            )
        return self.execution


@dataclass(frozen=True)
class Callbacks:
    """`execute(..., on_stdout=...)`: called as events arrive (async clients await them)."""

    on_stdout: Callable[[str], Any] | None = None
    on_stderr: Callable[[str], Any] | None = None
    on_result: Callable[[Result], Any] | None = None
    on_error: Callable[[ErrorInfo], Any] | None = None

    def __bool__(self) -> bool:
        return any((self.on_stdout, self.on_stderr, self.on_result, self.on_error))

    def handle(self, event: Event) -> Any:
        """Call the matching callback; returns what it returned (maybe an awaitable)."""
        if isinstance(event, StdoutEvent) and self.on_stdout:
            return self.on_stdout(event.text)
        if isinstance(event, StderrEvent) and self.on_stderr:
            return self.on_stderr(event.text)
        if isinstance(event, ResultEvent) and self.on_result:
            return self.on_result(event.result)
        if isinstance(event, ErrorEvent) and self.on_error:
            return self.on_error(event.error)
        return None


# -- tool calls, files, images ----------------------------------------------------------------


def tool_call_parts(tool_call: Any) -> tuple[str | None, Any]:
    """(id, arguments) of an OpenAI tool call: the SDK's object or a dict of the same shape
    (`{"id", "function": {"name", "arguments"}}`), or a bare `{"name", "arguments"}`."""
    if isinstance(tool_call, Mapping):
        function = tool_call.get("function") or tool_call
        call_id = tool_call.get("call_id") or tool_call.get("id")
        name, arguments = function.get("name"), function.get("arguments")
    else:
        function = getattr(tool_call, "function", None) or tool_call
        # Responses API items carry the id to answer with in `call_id`.
        call_id = getattr(tool_call, "call_id", None) or getattr(tool_call, "id", None)
        name, arguments = getattr(function, "name", None), getattr(function, "arguments", None)
    if name is not None and name != TOOL_NAME:
        raise ValueError(f"not a {TOOL_NAME} tool call: {name!r}")
    if arguments is None:
        raise ValueError(f"the tool call has no arguments: {tool_call!r}")
    return call_id, arguments


def read_source(source: FileSource, path: str | None) -> tuple[bytes, str]:
    """Upload contents and their path in the session: bytes (path needed), a local path
    (`str` or `PathLike`; its name is the default path) or a binary file object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not path:
            raise ValueError("uploading bytes needs the path to write them to")
        return bytes(source), path
    if isinstance(source, (str, os.PathLike)):
        local = Path(source)
        return local.read_bytes(), path or local.name
    data = source.read()
    if not path:
        name = getattr(source, "name", None)
        if not isinstance(name, str):
            raise ValueError("uploading a file object needs the path to write it to")
        path = Path(name).name
    return data, path


def remote_path(item: str | Image) -> str:
    return item.path if isinstance(item, Image) else item


def local_target(item: str | Image, dest: str | os.PathLike[str] | None) -> Path:
    """Where a downloaded file goes: `dest`, or its own name in `dest` (a directory) or in the
    current directory."""
    name = Path(remote_path(item)).name
    if dest is None:
        return Path(name)
    target = Path(dest)
    return target / name if target.is_dir() else target


def write_local(target: Path, data: bytes) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target
