"""Every error leaves as `{"error": {"code", "message"}}` with a fitting status."""

from __future__ import annotations

import errno
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kernelbox_server.sandbox.errors import (
    KernelStartError,
    PauseFailed,
    PoolExhausted,
    SessionBusy,
    SessionClosed,
    SessionLost,
    SessionNotFound,
)
from kernelbox_server.sandbox.files import FileOpTimeout, FileTooLarge, UnsafePath
from kernelbox_wire.models import ErrorBody, ErrorDetail

from .application import CodeTooLarge

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "session_busy",
    410: "session_lost",
    413: "too_large",
    422: "invalid_body",
    429: "pool_exhausted",
    503: "unavailable",
    507: "disk_full",
}


# The engine's (and the application layer's) errors, as the HTTP contract names them.
ENGINE_ERRORS: dict[type[Exception], tuple[int, str]] = {
    SessionNotFound: (404, "not_found"),
    SessionClosed: (404, "not_found"),
    SessionLost: (410, "session_lost"),
    SessionBusy: (409, "session_busy"),
    PauseFailed: (409, "pause_failed"),
    PoolExhausted: (429, "pool_exhausted"),
    KernelStartError: (503, "kernel_unavailable"),
    UnsafePath: (400, "bad_path"),
    FileTooLarge: (413, "too_large"),
    FileOpTimeout: (503, "file_timeout"),
    CodeTooLarge: (413, "too_large"),
}
# System errors a file operation can meet that are the caller's (or the session's) to fix.
OS_ERRORS: dict[int, tuple[int, str, str]] = {
    errno.ENOSPC: (507, "disk_full", "the session's disk is full"),
    errno.EDQUOT: (507, "disk_full", "the session's disk quota is used up"),
    errno.EFBIG: (413, "too_large", "the file is larger than a file may be"),
    errno.ENAMETOOLONG: (400, "bad_path", "the path is too long"),
}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, **extra))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


class ApiError(Exception):
    """Raised by routes for errors that are the caller's to fix."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException):
        code = _HTTP_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        fields = [
            {"loc": list(e["loc"]), "message": e["msg"], "type": e["type"]} for e in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(map(str, f['loc']))}: {f['message']}" for f in fields)
        kind = request.headers.get("content-type", "")
        if "json" not in kind and any(f["loc"] == ["body"] for f in fields):
            # The body was not read as JSON: say why (curl -d sends a form's type).
            summary += (
                f" (the body was sent as {kind!r}, not as JSON: "
                "send 'Content-Type: application/json')"
                if kind
                else " (send 'Content-Type: application/json')"
            )
        return error_response(422, "invalid_body", summary or "invalid request", fields=fields)

    async def _engine(_: Request, exc: Exception):
        status, code = ENGINE_ERRORS[type(exc)]
        headers = None
        if isinstance(exc, PoolExhausted):
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
        elif isinstance(exc, (KernelStartError, FileOpTimeout)):
            log.error("%s: %s", code, exc)
            headers = {"Retry-After": "5"}
        return error_response(status, code, str(exc), headers=headers)

    for error in ENGINE_ERRORS:
        app.add_exception_handler(error, _engine)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        if isinstance(exc, OSError) and exc.errno in OS_ERRORS:
            status, code, message = OS_ERRORS[exc.errno]
            return error_response(status, code, message)
        # The body says nothing of the internals (paths, addresses, library state): the log
        # has it, under an id the caller can quote.
        incident = uuid.uuid4().hex[:12]
        log.exception("unhandled error %s in %s %s", incident, request.method, request.url.path)
        return error_response(
            500, "internal", f"internal error {incident}; the service's log has the details"
        )
