"""A started kernel and the connection to it.

Messages are signed and serialised by jupyter_client's `Session` (the protocol), but received
by a reader task per socket that hands each message to whoever waits for its parent id.
jupyter_client's channel layer (a poller per `get_msg`, date parsing and version adaptation
per message) cost twice the host CPU per execution, and the service runs thousands of
executions per second across sessions.

The kernel is untrusted, so the host does not read it with libzmq (which assembles a whole
multipart message, of any number of parts, before handing any of it over): it speaks ZMTP on
the kernel's unix sockets itself (zmtp.py) and decides from each part's size whether to read
it at all: parts it does not need, and output past the execution's budget, are skipped as they
stream by.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.session import Session

from . import zmtp
from .backends.base import CannotAttach, ExitInfo, KernelBackend, KernelProcess, socket_path
from .errors import KernelStartError

log = logging.getLogger(__name__)

DELIM = b"<IDS|MSG>"
# Put into every waiting queue when the kernel can no longer be talked to (its process ended,
# or its connection broke: see Kernel.end).
DIED = {"msg_type": "__died__", "content": {}, "metadata": {}, "parent_header": {}}

# What the kernel sends is checked before it is decoded. Header, parent header and metadata
# are small in every honest message; replies and status messages are small; output (which
# code controls) is charged to the budget of its execution and dropped undecoded past it.
SMALL_PART_BYTES = 64 * 1024
CONTROL_BYTES = 1024**2
OUTPUT_TYPES = frozenset(
    {"stream", "display_data", "execute_result", "update_display_data", "error", "clear_output"}
)
CONTROL_TYPES = frozenset({"status", "execute_reply", "kernel_info_reply"})
# A start asks kernel_info until its status comes back on IOPub (see Kernel._wait_ready),
# again after ASK_AGAIN seconds without an answer, or REASK_AFTER_REPLY after a reply alone.
ASK_AGAIN = 0.25
REASK_AFTER_REPLY = 0.02
# Routing identities, the delimiter, five parts and a few binary buffers: an honest message.
MAX_FRAMES = 32


class ProtocolError(Exception):
    """The kernel sent something no kernel speaking the protocol would."""


@dataclass
class Budget:
    """Bytes of output that one request may bring into the host's memory."""

    remaining: int
    #: bytes of output dropped undecoded once the budget ran out
    dropped: int = 0
    exhausted: bool = False

    def charge(self, size: int) -> bool:
        """Whether a message of `size` bytes may be decoded; once one does not fit, none does."""
        if not self.exhausted and size <= self.remaining:
            self.remaining -= size
            return True
        self.exhausted = True
        self.dropped += size
        return False


@dataclass
class _Waiter:
    queue: asyncio.Queue[dict]
    budget: Budget | None


class KernelConnection:
    """Shell and IOPub sockets to one kernel; messages dispatched by parent msg_id.

    `on_fault(reason)` is called once if the kernel breaks the protocol (a malformed or
    oversized message, a dropped connection): it can no longer be relied on.
    """

    def __init__(
        self,
        info: dict[str, Any],
        shell: zmtp.Socket,
        iopub: zmtp.Socket,
        on_fault: Callable[[str], None],
    ) -> None:
        self.session = Session(
            key=info["key"].encode(),
            signature_scheme=info["signature_scheme"],
            username="kernelbox",
        )
        self.shell, self.iopub = shell, iopub
        self.fault: str | None = None
        self._on_fault = on_fault
        self._waiters: dict[str, _Waiter] = {}
        self._closed = False
        loop = asyncio.get_running_loop()
        self._readers = [loop.create_task(self._read_forever(s)) for s in (shell, iopub)]

    @classmethod
    async def open(
        cls, info: dict[str, Any], on_fault: Callable[[str], None], max_message_bytes: int
    ) -> KernelConnection:
        """Connect to a kernel whose sockets exist (ConnectionError if it does not listen)."""
        paths = [socket_path(info, channel) for channel in ("shell", "iopub")]
        for path in paths:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise KernelStartError(f"{path} is not a socket")
        shell = await zmtp.Socket.connect(paths[0], b"DEALER", max_message_bytes)
        try:
            iopub = await zmtp.Socket.connect(paths[1], b"SUB", max_message_bytes)
        except BaseException:
            shell.close()
            raise
        return cls(info, shell, iopub, on_fault)

    def send(
        self, msg_type: str, content: dict[str, Any], budget: Budget | None = None
    ) -> tuple[str, asyncio.Queue[dict]]:
        """Send a shell request; the queue receives every reply and IOPub message it causes,
        output only while it fits `budget` (when given)."""
        msg = self.session.msg(msg_type, content)
        msg_id = msg["header"]["msg_id"]
        queue: asyncio.Queue[dict] = asyncio.Queue()
        self._waiters[msg_id] = _Waiter(queue, budget)
        if self.fault is not None or self._closed:
            queue.put_nowait(DIED)
        else:
            self.shell.send(self.session.serialize(msg))
        return msg_id, queue

    def forget(self, msg_id: str) -> None:
        self._waiters.pop(msg_id, None)

    def broadcast(self, msg: dict) -> None:
        for waiter in self._waiters.values():
            waiter.queue.put_nowait(msg)

    async def _read_forever(self, sock: zmtp.Socket) -> None:
        try:
            while True:
                await self._read_message(sock)
                await asyncio.sleep(0)  # a kernel that floods must not hold the event loop
        except (ProtocolError, zmtp.ZmtpError) as exc:
            self._fail(f"the kernel broke the protocol: {exc}")
        except (asyncio.IncompleteReadError, OSError):
            self._fail("the kernel's connection dropped")

    async def _frame(self, sock: zmtp.Socket, count: list[int]) -> tuple[bool, int]:
        """The next frame of a message: (more follow, size); commands between messages are
        skipped (a ZMTP 3.0 peer sends none that matter)."""
        while True:
            more, command, size = await sock.next_frame()
            if not command:
                break
            if count[0]:
                raise ProtocolError("a command inside a message")
            await sock.skip(size)
        count[0] += 1
        if count[0] > MAX_FRAMES:
            raise ProtocolError(f"a message of more than {MAX_FRAMES} parts")
        return more, size

    async def _read_message(self, sock: zmtp.Socket) -> None:
        """Read one message within bounds; hand it over if anyone waits for it."""
        count = [0]
        while True:  # routing identities and the topic, then the delimiter
            more, size = await self._frame(sock, count)
            if size > SMALL_PART_BYTES:
                raise ProtocolError(f"a routing part of {size} bytes")
            if await sock.body(size) == DELIM:
                break
            if not more:
                raise ProtocolError("a message without its delimiter")
        small = []
        for _ in range(4):  # signature, header, parent header, metadata
            if not more:
                raise ProtocolError("a message without its five parts")
            more, size = await self._frame(sock, count)
            if size > SMALL_PART_BYTES:
                raise ProtocolError(f"a header part of {size} bytes")
            small.append(await sock.body(size))
        if not more:
            raise ProtocolError("a message without its content")
        more, size = await self._frame(sock, count)
        signature, header, parent, metadata = small
        accepted = self._accepts(header, parent, size)
        content = await sock.body(size) if accepted else None
        if content is None:
            await sock.skip(size)
        while more:  # binary buffers: nothing the engine uses
            more, size = await self._frame(sock, count)
            await sock.skip(size)
        if accepted is not None and content is not None:
            self._deliver(accepted, signature, header, parent, metadata, content)

    def _accepts(self, header: bytes, parent: bytes, size: int) -> _Waiter | None:
        """Who gets a message whose content is `size` bytes, if it is to be read at all."""
        parent_header = _object(parent, "parent header")
        waiter = self._waiters.get(str(parent_header.get("msg_id", "")))
        if waiter is None:
            return None  # nobody waits (late output of a finished execution, say)
        msg_type = _object(header, "header").get("msg_type")
        if not isinstance(msg_type, str):
            raise ProtocolError("a header without a msg_type")
        if msg_type in OUTPUT_TYPES:
            if waiter.budget is not None and not waiter.budget.charge(size):
                return None
        elif msg_type in CONTROL_TYPES:
            if size > CONTROL_BYTES:
                raise ProtocolError(f"a {msg_type} message of {size} bytes")
        else:
            return None  # execute_input and the like: nothing the engine uses
        return waiter

    def _deliver(
        self,
        waiter: _Waiter,
        signature: bytes,
        header: bytes,
        parent: bytes,
        metadata: bytes,
        content: bytes,
    ) -> None:
        if self.session.auth is not None:
            auth = self.session.auth.copy()
            for part in (header, parent, metadata, content):
                auth.update(part)
            if not hmac.compare_digest(auth.hexdigest().encode(), signature):
                raise ProtocolError("a message with an invalid signature")
        head = _object(header, "header")
        waiter.queue.put_nowait(
            {
                "msg_type": head["msg_type"],
                "header": head,
                "parent_header": _object(parent, "parent header"),
                "metadata": _object(metadata, "metadata"),
                "content": _object(content, f"{head['msg_type']} content"),
            }
        )

    def _fail(self, reason: str) -> None:
        if self.fault is None and not self._closed:
            self.fault = reason
            log.warning("kernel connection: %s", reason)
            self._on_fault(reason)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._readers:
            task.cancel()
        self.shell.close()
        self.iopub.close()


def _object(frame: bytes, what: str) -> dict[str, Any]:
    try:
        # Undecodable bytes become U+FFFD: jupyter_client encodes a lone surrogate in a
        # printed string with surrogateescape, which is not UTF-8.
        value = json.loads(frame.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        raise ProtocolError(f"a {what} that is not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"a {what} that is not an object")
    return value


class Kernel:
    """One kernel process plus its connection. Replaced as a whole on restart."""

    def __init__(self, proc: KernelProcess, max_message_bytes: int = 16 * 1024**2) -> None:
        self.proc = proc
        self.max_message_bytes = max_message_bytes
        self.conn: KernelConnection | None = None  # made once the kernel's sockets exist
        #: why the kernel can no longer be relied on although its process may live
        self.fault: str | None = None
        self.death: asyncio.Task[ExitInfo] = asyncio.get_running_loop().create_task(proc.wait())
        self.death.add_done_callback(lambda _: self.conn and self.conn.broadcast(DIED))

    def _faulted(self, reason: str) -> None:
        if self.fault is None:
            self.fault = reason
            if self.conn is not None:
                self.conn.broadcast(DIED)

    async def end(self) -> ExitInfo:
        """How the kernel ended (after DIED): its process's exit if that comes within a moment
        (a dropped connection is often the process ending, and the exit says more, e.g. out
        of memory), else the fault."""
        if not self.death.done() and self.fault is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.death), 1.0)
        if self.death.done() and not self.death.cancelled():
            return self.death.result()
        return ExitInfo(None, self.fault or "stopped answering")

    @classmethod
    def gone(cls, workdir: Path, reason: str, file_owner: tuple[int, int] | None = None) -> Kernel:
        """A kernel that is not running (a session restored without one): the session
        starts a fresh one when next used, and says that state was lost."""
        return cls(_NoProcess(workdir, reason, file_owner))

    @classmethod
    async def attach(
        cls, backend: KernelBackend, description: dict[str, Any], timeout: float = 10.0
    ) -> Kernel:
        """The running kernel that `description` (KernelProcess.describe) names, checked to
        answer (kernel_info) as a started one is. CannotAttach where the backend's kernels
        cannot outlive their service; KernelStartError where this one did not (the handle
        is released then, and the process removed)."""
        try:
            proc = await backend.attach(description)
        except CannotAttach:
            raise
        except Exception as exc:
            raise KernelStartError(f"the kernel could not be found again: {exc}") from exc
        return await cls._ready(proc, backend, timeout)

    async def detach(self, backend: KernelBackend) -> bool:
        """Let go of the kernel, leaving it running where the backend can (for the next
        service to attach to); whether it was left running (else it was stopped)."""
        if self.conn is not None:
            self.conn.close()
        if not self.alive:
            await self.shutdown()
            return False
        if not self.death.done():
            self.death.cancel()
        with contextlib.suppress(BaseException):
            await self.death
        return await backend.detach(self.proc)

    @property
    def running(self) -> bool:
        """Whether a process stands behind this kernel at all (not `gone`)."""
        return not isinstance(self.proc, _NoProcess)

    @classmethod
    async def start(
        cls,
        backend: KernelBackend,
        workdir: Path,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Kernel:
        timeout = timeout or backend.config.start_timeout
        try:
            proc = await backend.start(workdir, env)
        except Exception as exc:
            raise KernelStartError(
                f"the {backend.name} backend could not start a kernel: {exc}"
            ) from exc
        return await cls._ready(proc, backend, timeout)

    @classmethod
    async def _ready(cls, proc: KernelProcess, backend: KernelBackend, timeout: float) -> Kernel:
        """A kernel over `proc` once it answers; `proc` is shut down if it never does."""
        kernel = cls(proc, backend.config.max_message_bytes)
        try:
            await kernel._wait_ready(timeout)
        except BaseException:
            await kernel.shutdown()
            raise
        return kernel

    async def _wait_ready(self, timeout: float) -> None:
        """Ready means: the shell answers *and* IOPub is subscribed.

        The connection is made once the kernel has bound its sockets, and made again if the
        first attempt came too early (it is never remade later: the kernel can write its
        runtime directory, and a reconnect would follow whatever it put there). PUB/SUB
        drops messages until the subscription reaches the kernel, so a kernel_info reply alone
        would let the first execution's output vanish: kernel_info is repeated until its own
        status message comes back on IOPub.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        info = self.proc.connection_info
        sockets = [Path(socket_path(info, channel)) for channel in ("shell", "iopub")]
        connected_at = 0.0
        while True:
            if loop.time() > deadline:
                raise KernelStartError(
                    f"the kernel did not answer within {timeout:.0f} s; "
                    f"its log ends with: {self.proc.log_tail()!r}"
                )
            if not self.alive:
                why = self.death.result().reason if self.death.done() else self.fault
                raise KernelStartError(
                    f"the kernel failed during start-up ({why}); "
                    f"its log ends with: {self.proc.log_tail()!r}"
                )
            if self.conn is None or loop.time() - connected_at > 2.0:
                if not all(s.exists() for s in sockets):
                    await asyncio.sleep(0.02)
                    continue
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
                try:
                    async with asyncio.timeout(2.0):
                        self.conn = await KernelConnection.open(
                            info, self._faulted, self.max_message_bytes
                        )
                except (OSError, zmtp.ZmtpError, asyncio.IncompleteReadError):
                    await asyncio.sleep(0.05)  # bound but not listening yet: again
                    continue
                connected_at = loop.time()
            msg_id, queue = self.conn.send("kernel_info_request", {})
            try:
                async with asyncio.timeout(ASK_AGAIN) as wait:
                    while True:
                        msg = await queue.get()
                        if msg is DIED:
                            break
                        if msg["msg_type"] == "status":
                            return
                        if msg["msg_type"] == "kernel_info_reply":
                            # The kernel answered, so its status went out before the reply:
                            # missing now means our subscription came too late. Ask again
                            # at once (on a fast start this is the common case).
                            wait.reschedule(min(wait.when(), loop.time() + REASK_AFTER_REPLY))
            except TimeoutError:
                pass  # ask again: the subscription may not have been there yet
            finally:
                self.conn.forget(msg_id)

    @property
    def alive(self) -> bool:
        return not self.death.done() and self.fault is None

    async def shutdown(self) -> None:
        """Kill the process and release everything; safe to call twice."""
        if self.conn is not None:
            self.conn.close()  # first: the connection dropping now is no fault of the kernel's
        try:
            await self.proc.kill()
        finally:
            await self.proc.cleanup()
            if not self.death.done():
                self.death.cancel()
            with contextlib.suppress(BaseException):
                await self.death


class _NoProcess(KernelProcess):
    """Stands for a kernel that does not run (see `Kernel.gone`)."""

    backend_name = "none"

    def __init__(self, workdir: Path, reason: str, file_owner: tuple[int, int] | None) -> None:
        self.workdir = self.runtime_dir = workdir
        self.connection_info = {}
        self.file_owner = file_owner
        self._exit = ExitInfo(None, reason)

    async def poll(self) -> ExitInfo | None:
        return self._exit

    async def wait(self) -> ExitInfo:
        return self._exit

    async def send_signal(self, signum: int) -> None:
        return None

    async def kill(self) -> None:
        return None

    async def cleanup(self) -> None:
        return None

    def log_tail(self, max_chars: int = 2000) -> str:
        return ""
