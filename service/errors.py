"""Every error leaves as `{"error": {"code", "message"}}` with a fitting status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kernelbox.models import ErrorBody, ErrorDetail
from sandbox.errors import (
    KernelStartError,
    PoolExhausted,
    SessionBusy,
    SessionClosed,
    SessionNotFound,
)
from sandbox.files import FileTooLarge, UnsafePath

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "session_busy",
    413: "too_large",
    422: "invalid_body",
    429: "pool_exhausted",
    503: "unavailable",
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
    async def _invalid(_: Request, exc: RequestValidationError):
        fields = [
            {"loc": list(e["loc"]), "message": e["msg"], "type": e["type"]} for e in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(map(str, f['loc']))}: {f['message']}" for f in fields)
        return error_response(422, "invalid_body", summary or "invalid request", fields=fields)

    @app.exception_handler(SessionNotFound)
    async def _not_found(_: Request, exc: SessionNotFound):
        return error_response(404, "not_found", str(exc))

    @app.exception_handler(SessionClosed)
    async def _closed(_: Request, exc: SessionClosed):
        return error_response(404, "not_found", str(exc))

    @app.exception_handler(SessionBusy)
    async def _busy(_: Request, exc: SessionBusy):
        return error_response(409, "session_busy", str(exc))

    @app.exception_handler(PoolExhausted)
    async def _exhausted(_: Request, exc: PoolExhausted):
        retry = str(max(1, round(exc.retry_after)))
        return error_response(429, "pool_exhausted", str(exc), headers={"Retry-After": retry})

    @app.exception_handler(KernelStartError)
    async def _no_kernel(_: Request, exc: KernelStartError):
        log.error("kernel unavailable: %s", exc)
        return error_response(503, "kernel_unavailable", str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(UnsafePath)
    async def _unsafe(_: Request, exc: UnsafePath):
        return error_response(400, "bad_path", str(exc))

    @app.exception_handler(FileTooLarge)
    async def _too_large(_: Request, exc: FileTooLarge):
        return error_response(413, "too_large", str(exc))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal", f"{exc.__class__.__name__}: {exc}")
