"""The SDK's exceptions: one class per thing a caller may want to handle differently.

    KernelboxError
    ├── APIError                  the service answered with an error body
    │   ├── InvalidRequest        400, 422 (bad path, invalid body)
    │   ├── Unauthorized          401 (missing or wrong API key)
    │   ├── NotFound              404
    │   │   ├── SessionNotFound   no such session (or not yours)
    │   │   └── FileNotFound      no such file in the session
    │   ├── SessionBusy           409 (the session is running other code)
    │   ├── PayloadTooLarge       413
    │   └── PoolExhausted         429: every session slot is taken (see `retry_after`)
    │       └── ServiceUnavailable  503: no kernel could be started
    ├── ConnectionError           the service could not be reached (names the URL)
    ├── RequestTimeout            no answer in time (names the URL)
    └── ExecutionError            the code failed; only with `raise_on_error=True`
        ├── ExecutionTimeout      the deadline passed
        └── KernelDied            the kernel process ended

`ConnectionError` and `RequestTimeout` also derive from the builtins of the same name, so
code written against plain Python exceptions keeps working.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kernelbox_wire.models import Execution


class KernelboxError(Exception):
    """Base class of every error the SDK raises."""


class APIError(KernelboxError):
    """An error answer of the service: HTTP `status`, the body's `code` and `message`.

    `status` is None for an error reported inside an event stream (a `fail` event).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        fields: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        self.message = message
        self.status = status
        self.code = code
        self.fields = fields
        self.retry_after = retry_after
        self.method = method
        self.url = url
        where = f" ({method} {url})" if method and url else ""
        prefix = f"{status} {code}" if status is not None else code
        super().__init__(f"{prefix}: {message}{where}")


class InvalidRequest(APIError):
    """400 or 422: the request was refused as it stands; `fields` says where, when known."""


class Unauthorized(APIError):
    """401: no API key, or one the service does not know."""


class NotFound(APIError):
    """404."""


class SessionNotFound(NotFound):
    """404: no such session, it expired, or another API key owns it."""


class FileNotFound(NotFound):
    """404: no such file in the session's working directory."""


class SessionBusy(APIError):
    """409: the session is running other code (one execution at a time per session)."""


class SessionLost(APIError):
    """410: the machine that ran the session is gone (a service spread over a cluster), with
    its kernel and files; delete the session and create another."""


class PayloadTooLarge(APIError):
    """413: the code, the request body or the file is over the service's limit."""


class PoolExhausted(APIError):
    """429: every session slot is taken; `retry_after` is the service's hint, in seconds.

    Raised once the client's own retries are spent.
    """


class ServiceUnavailable(PoolExhausted):
    """503: the service cannot serve now (no kernel could be started); see `retry_after`."""


class ConnectionError(KernelboxError, builtins.ConnectionError):
    """The service at `url` could not be reached, or the connection broke."""

    def __init__(self, message: str, *, url: str) -> None:
        KernelboxError.__init__(self, message)
        self.url = url

    def __str__(self) -> str:
        return str(self.args[0])


class RequestTimeout(KernelboxError, builtins.TimeoutError):
    """The service at `url` did not answer within the client's timeout."""

    def __init__(self, message: str, *, url: str) -> None:
        KernelboxError.__init__(self, message)
        self.url = url

    def __str__(self) -> str:
        return str(self.args[0])


class ExecutionError(KernelboxError):
    """The code raised (status `error`); carries the whole `execution`."""

    def __init__(self, execution: Execution) -> None:
        self.execution = execution
        error = execution.error
        text = f"{error.name}: {error.value}" if error else f"execution {execution.status}"
        super().__init__(text)


class ExecutionTimeout(ExecutionError):
    """The deadline passed; the code was interrupted (see `execution.kernel_restarted`)."""


class KernelDied(ExecutionError):
    """The kernel process ended (out of memory, a crash); the session has a fresh one."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: SessionBusy,
    410: SessionLost,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: PoolExhausted,
    503: ServiceUnavailable,
}


def error_class(status: int) -> type[APIError]:
    return _BY_STATUS.get(status, APIError)


def raise_for_execution(execution: Execution) -> Execution:
    """The `raise_on_error=True` behaviour: an exception for every status but `ok`."""
    if execution.status == "timeout":
        raise ExecutionTimeout(execution)
    if execution.status == "died":
        raise KernelDied(execution)
    if execution.status != "ok":
        raise ExecutionError(execution)
    return execution
