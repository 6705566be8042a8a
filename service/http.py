"""uvicorn's HTTP protocol with a deadline for request headers.

uvicorn arms no timer until a request's headers are in, and any byte received cancels its
keep-alive timer: a client that connects and sends nothing, or one header byte every few
seconds, holds a connection (and a file descriptor) forever. Here each request's headers must
arrive within `header_timeout` seconds of its first byte (or of the connection, for the first
request); otherwise the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


class _HeaderDeadline(HttpToolsProtocol):
    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        log.info("closing a connection whose request headers took over %g s", self.header_timeout)
        self.transport.close()


def http_protocol(header_timeout: float) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn (`uvicorn.Config(http=...)`)."""
    return type("HeaderDeadlineProtocol", (_HeaderDeadline,), {"header_timeout": header_timeout})
