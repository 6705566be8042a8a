"""The local backend's forked kernels: each a fork of a warm template, not a new interpreter.

A kernel template (sandbox/kernel_template_boot.py) runs in a bwrap sandbox like a kernel's,
with ipykernel, IPython and the data stack imported; each kernel is a fork of it that builds
the sandbox a spawned kernel gets from bwrap (its own PID, mount, IPC, user and network
namespaces; its session's uid; fresh /tmp, /mnt, /data, /dev/shm and runtime directory; the
working directory at the same path) before it runs ipykernel. A kernel is then ready in tens
of milliseconds instead of a second, and its idle memory is mostly pages it shares with the
template. Only for a root service with bwrap: the service makes a detached mount of each
working directory (open_tree), which the child attaches in its own mount namespace.

The template runs no code of anyone's and never reads a request (see its docstring). If it
dies, the kernels forked from it die with it (they live in its PID namespace), the backend
starts another, and kernels are spawned meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import SANDBOX_RUNTIME, ExitInfo, KernelProcess, connection_info_at
from .bwrap import RUNTIME_BYTES, SHM_BYTES, TMP_BYTES, host_path
from .launch import OutputTail, describe_exit, tree_pss

if TYPE_CHECKING:
    from .local import LocalBackend, LocalKernel

log = logging.getLogger(__name__)

#: the template's socket, in its runtime directory
TEMPLATE_SOCKET = "kt.sock"
SYS_OPEN_TREE = 428  # the same number on x86_64 and aarch64
OPEN_TREE_CLONE, AT_RECURSIVE = 0x1, 0x8000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def detached_mount(path: Path) -> int:
    """A detached copy of the mount tree at `path` (open_tree(OPEN_TREE_CLONE)): an fd that
    a process in another mount namespace can attach (move_mount), as bwrap's --bind would."""
    fd = _libc.syscall(
        SYS_OPEN_TREE, -100, str(path).encode(), OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC
    )
    if fd < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"open_tree({path}): {os.strerror(errno)}")
    return int(fd)


def memfd_with(data: bytes) -> int:
    fd = os.memfd_create("kernelbox-request", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
    except BaseException:
        os.close(fd)
        raise
    return fd


class ForkedKernel(KernelProcess):
    """A kernel forked from a template. `init_pid` is the host pid of its PID namespace's
    PID 1 (the template's child, which reports how the kernel ended on `conn`)."""

    backend_name = "local"

    def __init__(
        self,
        conn: socket.socket,
        init_pid: int,
        workdir: Path,
        info: dict,
        registry: set,
        output: OutputTail,
        file_owner: tuple[int, int] | None,
    ) -> None:
        self._conn = conn
        self.init_pid = init_pid
        self._pidfd: int | None = os.pidfd_open(init_pid)
        self.workdir = workdir
        self.runtime_dir = host_path(init_pid, SANDBOX_RUNTIME)
        self.connection_info = connection_info_at(info, self.runtime_dir)
        self._registry = registry
        self._output = output
        self.file_owner = file_owner
        self.setup_error: str | None = None
        self._ended: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self._watch = asyncio.ensure_future(self._watch_conn())

    @property
    def pid(self) -> int:
        return self.init_pid

    async def _watch_conn(self) -> None:
        """Its PID 1's reports: "E..." (set-up failed), "X<status>" (the kernel ended); EOF
        without one, it was killed."""
        loop = asyncio.get_running_loop()
        info = ExitInfo(-9, "killed by signal 9 (SIGKILL)")
        try:
            while True:
                try:
                    data = await loop.sock_recv(self._conn, 65536)
                except OSError as exc:
                    info = ExitInfo(None, f"lost its template ({exc})")
                    break
                if not data:
                    break
                if data[:1] == b"E":
                    self.setup_error = data[1:].decode(errors="replace")
                    info = ExitInfo(255, f"could not start: {self.setup_error}")
                elif data[:1] == b"X":
                    info = describe_exit(os.waitstatus_to_exitcode(int(data[1:])))
        finally:
            if not self._ended.done():
                self._ended.set_result(info)

    async def poll(self) -> ExitInfo | None:
        return self._ended.result() if self._ended.done() else None

    async def wait(self) -> ExitInfo:
        return await asyncio.shield(self._ended)

    def _alive(self) -> bool:
        if self._pidfd is None or self._ended.done():
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, 0)
            return True
        except ProcessLookupError:
            return False

    async def send_signal(self, signum: int) -> None:
        # Its PID 1's process group, which the kernel and what it started are in (PID 1
        # ignores the signals an interrupt sends).
        if self._alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.init_pid, signum)

    async def kill(self) -> None:
        # Its PID 1 gone, every process of its namespace is killed.
        if self._alive():
            assert self._pidfd is not None
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        await self.wait()

    async def cleanup(self) -> None:
        self._registry.discard(self)
        self._output.close()
        if not self._watch.done():
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        self._conn.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def log_tail(self, max_chars: int = 2000) -> str:
        return self._output.tail(max_chars)

    def memory_pss(self) -> int | None:
        return tree_pss(self.init_pid)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pid": self.init_pid, "init_pid": self.init_pid}


class KernelTemplate:
    """The backend's one kernel template: started on first use, replaced when it dies
    (kernels are spawned while there is none), removed with the backend."""

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self.handle: LocalKernel | None = None
        self._starting: asyncio.Task[LocalKernel] | None = None
        self.last_error: str | None = None
        self._retry_at = 0.0
        self.restarts = 0

    @staticmethod
    def socket_of(handle: LocalKernel) -> Path:
        assert handle.init_pid is not None
        return host_path(handle.init_pid, SANDBOX_RUNTIME) / TEMPLATE_SOCKET

    async def ready(self, wait: bool = True) -> LocalKernel | None:
        """The running template; starts one if there is none. `wait`: until it serves (else
        None while it starts, or while it may not be retried yet after a failure)."""
        if self.handle is not None and self.handle._proc.returncode is None:
            return self.handle
        if self.handle is not None:  # it died: its kernels went with it
            log.warning("kernel template died (%s); starting another", self.handle.log_tail(500))
            await self._remove()
            self.restarts += 1
        if self._starting is None or self._starting.get_loop() is not asyncio.get_running_loop():
            if time.monotonic() < self._retry_at:
                return None
            self._starting = asyncio.ensure_future(self._start())
            self._starting.add_done_callback(self._started)
        if not wait and not self._starting.done():
            return None
        try:
            return await asyncio.shield(self._starting)
        except Exception:
            return None  # said by _started; kernels are spawned
        finally:
            if self._starting is not None and self._starting.done():
                self._starting = None

    def _started(self, task: asyncio.Task[LocalKernel]) -> None:
        """Said even when no start awaits it (a start that did not wait for the template)."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.last_error = f"{exc.__class__.__name__}: {exc}"
        self._retry_at = time.monotonic() + 5.0  # kernels are spawned until then
        log.warning("kernel template did not start (%s); spawning kernels", self.last_error)

    async def _start(self) -> LocalKernel:
        handle = await self.backend.launch_kernel_template()
        deadline = time.monotonic() + self.backend.config.start_timeout
        try:
            while True:  # it listens once its imports are done
                if handle._proc.returncode is not None:
                    why = describe_exit(handle._proc.returncode).reason
                    raise RuntimeError(f"it {why}: {handle.log_tail(1000)}")
                if self.socket_of(handle).exists():
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("it did not listen in time")
                await asyncio.sleep(0.02)
        except BaseException:
            await self._remove(handle)
            raise
        self.last_error = None
        self.handle = handle  # only now: a template that does not serve yet is none
        return handle

    async def _remove(self, handle: LocalKernel | None = None) -> None:
        if handle is None:
            handle, self.handle = self.handle, None
        if handle is not None:
            await handle.kill()
            await handle.cleanup()

    async def fork(
        self,
        template: LocalKernel,
        *,
        workdir: Path,
        request: dict,
        info: dict,
        file_owner: tuple[int, int] | None,
    ) -> ForkedKernel:
        """One kernel forked from `template`, for `workdir`; returns once it exists (the
        engine waits for it to answer)."""
        loop = asyncio.get_running_loop()
        header = {
            "op": "fork",
            "tmp_bytes": TMP_BYTES,
            "shm_bytes": SHM_BYTES,
            "runtime_bytes": RUNTIME_BYTES,
        }
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        conn.setblocking(False)
        out_r, out_w = os.pipe()
        fds: list[int] = [out_w]
        try:
            fds += [memfd_with(json.dumps(request).encode()), detached_mount(workdir)]
            await loop.sock_connect(conn, str(self.socket_of(template)))
            # (the order the template expects: request, workdir, output)
            rights = struct.pack("3i", fds[1], fds[2], fds[0])
            conn.sendmsg(
                [json.dumps(header).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
            )
            init_pid = await self._first_report(conn)
        except BaseException:
            conn.close()
            os.close(out_r)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        output = OutputTail(out_r)
        try:
            return ForkedKernel(
                conn, init_pid, workdir, info, self.backend._kernels, output, file_owner
            )
        except BaseException:
            conn.close()
            output.close()
            raise

    async def _first_report(self, conn: socket.socket) -> int:
        """The host pid of the new kernel's PID 1, from the credentials of its first packet."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(conn.fileno(), ready.set)
        try:
            async with asyncio.timeout(self.backend.config.start_timeout):
                while True:
                    await ready.wait()
                    ready.clear()
                    try:
                        data, ancdata, _flags, _addr = conn.recvmsg(
                            65536, socket.CMSG_SPACE(struct.calcsize("3i"))
                        )
                    except BlockingIOError:
                        continue
                    break
        finally:
            loop.remove_reader(conn.fileno())
        if data[:1] != b"P":
            said = data[1:].decode(errors="replace") if data else "the template closed it"
            raise RuntimeError(f"kernel template refused the fork: {said}")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("3i", payload[: struct.calcsize("3i")])
                return pid
        raise RuntimeError("kernel template's child sent no credentials")
