"""The service's side of the fork-server protocol: one template, one connection per run.

The code and files travel in a memfd the child reads, stdout and stderr come back through
pipes the service reads itself (head kept up to a cap, the rest counted and dropped), and
fetched files come back in another memfd, all with asyncio on the template's unix socket
(named by its connection info). See forkserver_boot.py for the other side.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .base import KernelProcess, socket_path
from .launch import FORKSERVER_BOOT

log = logging.getLogger(__name__)

SETUP_FAILED = 255  # forkserver_boot.SETUP_FAILED


class ForkServerError(RuntimeError):
    """The fork server could not run the code (it is the sandbox's fault, not the code's)."""


@dataclass
class RunRequest:
    code: str
    timeout: float = 10.0
    stdin: str | bytes | None = None
    #: relative path -> base64 content (checked by the caller)
    files: dict[str, str] = field(default_factory=dict)
    fetch_files: list[str] = field(default_factory=list)
    #: address-space limit for this run (lower than the backend's only)
    memory_bytes: int | None = None
    #: "python": the code runs as `python file.py`; "pytest": as `pytest file.py *args`
    language: Literal["python", "pytest"] = "python"
    args: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    status: Literal["finished", "timeout"]
    exit_code: int | None  # as Popen.returncode: negative for a signal; None after a timeout
    stdout: str
    stderr: str
    duration: float  # seconds of wall time, fork to exit
    files: dict[str, bytes] = field(default_factory=dict)


# -- one template ------------------------------------------------------------------------------


class Template:
    """The service's handle on one template process (or container)."""

    def __init__(self, proc: KernelProcess, slots: int) -> None:
        self.proc = proc
        # The transport is the backend's business: its connection info names the socket.
        self.socket_path = Path(socket_path(proc.connection_info))
        self.slots = slots
        self.active = 0
        #: what it said when it was ready (its pid, slots, uid range, whether it forks kernels)
        self.info: dict = {}
        self.death: asyncio.Task = asyncio.get_running_loop().create_task(proc.wait())

    @property
    def alive(self) -> bool:
        return not self.death.done()

    async def wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if not self.alive:
                raise ForkServerError(
                    f"the fork server {self.death.result().reason} during start-up; "
                    f"its log ends with: {self.proc.log_tail()!r}"
                )
            if loop.time() > deadline:
                raise ForkServerError(
                    f"the fork server did not start within {timeout:.0f} s; "
                    f"its log ends with: {self.proc.log_tail()!r}"
                )
            if self.socket_path.exists():
                try:
                    reply = await self._ping()
                except OSError:
                    reply = None
                if reply and reply.get("ok"):
                    if reply.get("boot_sha256") not in (None, _boot_hash()):
                        log.warning(
                            "the fork server runs another forkserver_boot.py than this "
                            "checkout's; rebuild the kernel image (scripts/build-kernel-image.sh)"
                        )
                    self.info = reply
                    return
            await asyncio.sleep(0.05)

    async def _ping(self) -> dict | None:
        loop = asyncio.get_running_loop()
        with _unix_socket() as sock:
            await loop.sock_connect(sock, str(self.socket_path))
            header = json.dumps({"op": "ping"}).encode()
            await loop.sock_sendall(sock, struct.pack("!I", len(header)) + header)
            line = await asyncio.wait_for(_read_line(loop, sock), 10)
        return json.loads(line) if line else None

    async def run(self, req: RunRequest, output_cap_bytes: int, drain_grace: float) -> RunResult:
        """Run `req` in a fresh child: at most `output_cap_bytes` kept per stream, and the
        pipes given `drain_grace` seconds to reach EOF after the run's end."""
        loop = asyncio.get_running_loop()
        payload = {
            "code": req.code,
            "files": req.files,
            "fetch_files": req.fetch_files,
            "language": req.language,
            "args": req.args,
        }
        stdin = req.stdin.encode() if isinstance(req.stdin, str) else (req.stdin or b"")
        owned: list[int] = []  # our fds, closed whatever happens
        readers: list[_Reader] = []
        try:
            req_fd = _memfd(json.dumps(payload).encode(), owned)
            stdin_fd = _memfd(stdin, owned)
            result_fd = _memfd(b"", owned)
            out_r, out_w = _pipe(owned)
            err_r, err_w = _pipe(owned)
            with _unix_socket() as sock:
                await loop.sock_connect(sock, str(self.socket_path))
                header = {
                    "op": "run",
                    "timeout": req.timeout,
                    "fetch": bool(req.fetch_files),
                    "memory": req.memory_bytes,
                }
                await _send_with_fds(
                    loop, sock, header, [req_fd, stdin_fd, out_w, err_w, result_fd]
                )
                # The child holds the write ends now: EOF comes when every process of the run
                # is gone (the template kills them all when the run ends).
                for fd in (req_fd, stdin_fd, out_w, err_w):
                    _close(fd, owned)
                readers = [
                    _Reader(loop, out_r, output_cap_bytes, owned),
                    _Reader(loop, err_r, output_cap_bytes, owned),
                ]
                try:
                    # The template enforces the deadline; this bound is for a template that
                    # stopped answering.
                    line = await asyncio.wait_for(_read_line(loop, sock), req.timeout + 30)
                except TimeoutError:
                    raise ForkServerError(
                        "the fork server did not report the end of the run"
                    ) from None
            if not line:
                raise ForkServerError(
                    "the fork server ended during the run"
                    if not self.alive
                    else "the fork server closed the connection during the run"
                )
            reply = json.loads(line)
            if reply.get("error"):
                raise ForkServerError(f"the fork server refused the run: {reply['error']}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_grace):
                    await asyncio.gather(*(r.done for r in readers))
            stdout, stderr = (r.text() for r in readers)
            extra = _read_all(result_fd)
            if extra.startswith(b"E") and reply.get("exit") == SETUP_FAILED:
                raise ForkServerError(
                    f"could not set the run up: {extra[1:].decode(errors='replace')}"
                )
            return RunResult(
                status="timeout" if reply.get("timeout") else "finished",
                exit_code=reply.get("exit"),
                stdout=stdout,
                stderr=stderr,
                duration=float(reply.get("elapsed") or 0.0),
                files=_parse_fetched(extra) if req.fetch_files else {},
            )
        finally:
            for reader in readers:
                reader.stop()
            for fd in list(owned):
                _close(fd, owned)

    async def discard(self) -> None:
        """Kill the template and release what it held."""
        try:
            await self.proc.kill()
        finally:
            await self.proc.cleanup()
            if not self.death.done():
                self.death.cancel()
            with contextlib.suppress(BaseException):
                await self.death

    async def fork_kernel(
        self, uid: int, request: dict, output_fd: int, timeout: float
    ) -> tuple[socket.socket, int]:
        """Fork a kernel (a template started with --kernels; forkserver_boot.py says the
        protocol): `request` is {"argv", "env", "workdir"}, `output_fd` the write end of the
        pipe for what it prints outside the protocol. Returns the connection (the template's
        JSON line on it says how the kernel ended) and the memfd its set-up error goes to."""
        loop = asyncio.get_running_loop()
        owned: list[int] = []
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            req_fd = _memfd(json.dumps(request).encode(), owned)
            stdin_fd = _memfd(b"", owned)
            result_fd = _memfd(b"", owned)
            await loop.sock_connect(sock, str(self.socket_path))
            header = {"op": "kernel", "uid": uid, "timeout": timeout}
            fds = [req_fd, stdin_fd, output_fd, output_fd, result_fd]
            await _send_with_fds(loop, sock, header, fds)
        except BaseException:
            sock.close()
            for fd in list(owned):
                _close(fd, owned)
            raise
        for fd in (req_fd, stdin_fd):
            _close(fd, owned)
        return sock, result_fd

    def memory_pss(self) -> int | None:
        """Proportional set size of the template with the children it has forked ahead of
        demand (they share its pages, so its own PSS alone would undercount); measured idle,
        that is the template's whole cost. Docker: of the whole container."""
        pss = getattr(self.proc, "memory_pss", None)
        return pss() if pss else None


class _Reader:
    """Reads one pipe on the event loop: keeps the head up to `cap` bytes, counts the rest."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, fd: int, cap: int, owned: list[int]
    ) -> None:
        self.loop, self.fd, self.cap, self.owned = loop, fd, cap, owned
        self.head = bytearray()
        self.dropped = 0
        self.done: asyncio.Future[None] = loop.create_future()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._read)

    def _read(self) -> None:
        # Bounded per wake-up: a run flooding its pipe must not hold the event loop.
        for _ in range(16):
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.stop()
                return
            room = self.cap - len(self.head)
            if room > 0:
                self.head += chunk[:room]
            self.dropped += max(0, len(chunk) - max(room, 0))

    def stop(self) -> None:
        if self.fd in self.owned:
            self.loop.remove_reader(self.fd)
            _close(self.fd, self.owned)
        if not self.done.done():
            self.done.set_result(None)

    def text(self) -> str:
        text = self.head.decode("utf-8", "replace")
        if self.dropped:
            text += f"...[{self.dropped} bytes truncated]"
        return text


# -- low-level helpers -------------------------------------------------------------------------


def _boot_hash() -> str:
    global _BOOT_HASH
    if _BOOT_HASH is None:
        _BOOT_HASH = hashlib.sha256(FORKSERVER_BOOT.read_bytes()).hexdigest()
    return _BOOT_HASH


_BOOT_HASH: str | None = None


@contextlib.contextmanager
def _unix_socket():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()  # the template kills a run whose connection closes


def _memfd(data: bytes, owned: list[int]) -> int:
    fd = os.memfd_create("kernelbox-run", os.MFD_CLOEXEC)
    owned.append(fd)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)  # stdin is read from the current offset
    return fd


def _pipe(owned: list[int]) -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    owned += [r, w]
    return r, w


def _close(fd: int, owned: list[int]) -> None:
    if fd in owned:
        owned.remove(fd)
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


async def _send_with_fds(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, header: dict, fds: list[int]
) -> None:
    body = json.dumps(header).encode()
    frame = struct.pack("!I", len(body)) + body
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))]
    while True:
        try:
            sent = sock.sendmsg([frame], rights)
            break
        except BlockingIOError:
            writable = loop.create_future()
            loop.add_writer(sock.fileno(), writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(sock.fileno())
    if sent < len(frame):  # the descriptors went with the first byte
        await loop.sock_sendall(sock, frame[sent:])


async def _read_line(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            return b""
        buf += chunk
    return buf


def _parse_fetched(data: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if not data.startswith(b"F"):
        return out
    pos = 1
    while pos + 12 <= len(data):
        name_len, size = struct.unpack_from("!IQ", data, pos)
        pos += 12
        name = data[pos : pos + name_len].decode("utf-8", "surrogatepass")
        pos += name_len
        out[name] = data[pos : pos + size]
        pos += size
    return out
