"""A real uvicorn server on loopback, in a thread of its own, for tests that speak HTTP."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from kernelbox_server.service.app import create_app
from kernelbox_server.service.http import http_protocol
from kernelbox_server.service.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    app: FastAPI
    settings: Settings

    @property
    def manager(self):
        return self.app.state.application.engine.manager

    def client(self, key: str | None = None, timeout: float = 120) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)


def listening_socket(port: int = 0) -> socket.socket:
    """A socket bound on loopback, for uvicorn to serve on: binding here, not in uvicorn,
    leaves no gap in which another process can take the port (as an outgoing connection's
    ephemeral port did in CI)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextlib.contextmanager
def serving(app, sock: socket.socket | None = None, **config) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread on loopback; yields its base URL."""
    sock = sock or listening_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


@contextlib.contextmanager
def running_server(wait_ready: bool = True, **settings) -> Iterator[RunningServer]:
    if "data_dir" not in settings:
        # A data directory of its own (sessions outlive their service there, and one service
        # owns it), short for the kernels' unix sockets; removed with the server.
        with tempfile.TemporaryDirectory(prefix="kb-") as data_dir:
            os.chmod(data_dir, 0o755)  # kernels running as another user reach their files
            with running_server(wait_ready, data_dir=Path(data_dir), **settings) as server:
                yield server
        return
    # A test's leftover sessions must not leave their kernels running (Docker's would outlive
    # the server): tests of sessions that outlive the service say otherwise (test_durable.py).
    settings.setdefault("stop_kernels_on_shutdown", True)
    sock = listening_socket(settings.get("port", 0))
    config = Settings(**{**settings, "port": sock.getsockname()[1]})
    app = create_app(config)
    # As `kernelbox serve` runs it: a keep-alive longer than httpx's 5 s, or a client may send
    # on a connection the server is just closing; the header deadline.
    protocol = http_protocol(config.header_timeout)
    with serving(app, sock, http=protocol, timeout_keep_alive=75) as url:
        if wait_ready and config.min_idle:
            _wait_for_warm(url, config.min_idle)
        yield RunningServer(url, app, config)


def _wait_for_warm(url: str, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body = httpx.get(f"{url}/readyz").json()
        except httpx.TransportError:  # not listening yet
            body = {}
        if body.get("idle_kernels", 0) >= n:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the pool did not warm {n} kernels in {timeout} s")
