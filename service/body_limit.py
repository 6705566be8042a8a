"""Request body limits that answer in the API's own error body.

(FastAPI's `max_body_size` answers a bare text/plain "Content Too Large"; clients of this API
parse `{"error": {...}}` on every non-2xx.) File uploads get a larger limit than JSON bodies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_FILE_ROUTE = re.compile(r"^/v1/sessions/[^/]+/files/")


# A rejected body is still read (and dropped) up to this size, so that the client, which is
# still sending, can read our 413 instead of seeing the connection reset.
DRAIN_LIMIT = 256 * 1024**2


def limit_by_route(json_limit: int, file_limit: int) -> Callable[[Scope], int]:
    return lambda scope: file_limit if _FILE_ROUTE.match(scope["path"]) else json_limit


class BodyLimitMiddleware:
    """Reads each request's body, up to its limit, before the app sees any of it: so an
    oversized body is a 413 whether or not it declared its length (a chunked one would
    otherwise fail inside the app's JSON parsing, as a 400)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _drain(receive, int(declared))
            await _reject(send, limit)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before it finished sending
            body += message.get("body", b"")
            if len(body) > limit:
                if message.get("more_body", False):
                    await _drain(receive, DRAIN_LIMIT)
                await _reject(send, limit)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: only a disconnect comes
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


async def _drain(receive: Receive, at_most: int) -> None:
    if at_most > DRAIN_LIMIT:
        return  # not worth reading: the client will see the connection close
    seen = 0
    while seen <= at_most:
        message = await receive()
        seen += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _reject(send: Send, limit: int) -> None:
    body = json.dumps(
        {"error": {"code": "too_large", "message": f"the request body is over {limit} bytes"}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
