"""A started kernel and the ZMQ connection to it.

Messages are signed and serialised by jupyter_client's `Session` (the protocol), but received
by an event-loop reader per socket that hands each message to whoever waits for its parent
id. jupyter_client's channel layer (a poller per `get_msg`, date parsing and version adaptation
per message) cost twice the host CPU per execution, and the service runs thousands of
executions per second across sessions.

The sockets are plain (non-asyncio) ZMQ sockets watched with `loop.add_reader` on their FD.
ZMQ's FD is edge-triggered and *any* operation on the socket, a send included, can consume
the edge; so input is drained until `EVENTS` says there is none, after every wake-up and
after every send. (A zmq.asyncio socket that one task sends on while another awaits a recv
on it lost about 2% of shell replies under load here.)
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

import zmq
from jupyter_client.session import Session
from zmq.utils import monitor as zmq_monitor

from .backends.base import ExitInfo, KernelBackend, KernelProcess
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
# Messages ZMQ queues per socket before it stops reading from the kernel (which then drops
# IOPub output, or blocks on the shell): with the message size limit, a bound on what a
# flooding kernel makes the host hold before Python sees it.
IOPUB_HWM = 8
SHELL_HWM = 4


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
        on_fault: Callable[[str], None],
        max_message_bytes: int = 16 * 1024**2,
    ) -> None:
        for port in (info["shell_port"], info["iopub_port"]):
            path = f"{info['ip']}-{port}"
            if info["transport"] == "ipc" and not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise KernelStartError(f"{path} is not a socket")
        self.session = Session(
            key=info["key"].encode(),
            signature_scheme=info["signature_scheme"],
            username="kernelbox",
        )
        self.max_message_bytes = max_message_bytes
        self._on_fault = on_fault
        self.fault: str | None = None
        self._loop = asyncio.get_running_loop()
        ctx = zmq.Context.instance()
        self.shell = self._socket(ctx, zmq.DEALER, info, info["shell_port"], SHELL_HWM)
        self.iopub = self._socket(ctx, zmq.SUB, info, info["iopub_port"], IOPUB_HWM)
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self._waiters: dict[str, _Waiter] = {}
        self._closed = False
        # A message over the size limit makes ZMQ drop the connection, silently but for this.
        self._monitors = [
            s.get_monitor_socket(zmq.EVENT_DISCONNECTED) for s in (self.shell, self.iopub)
        ]
        for sock in (self.shell, self.iopub):
            self._loop.add_reader(sock.getsockopt(zmq.FD), self._drain, sock)
        for mon in self._monitors:
            self._loop.add_reader(mon.getsockopt(zmq.FD), self._watch, mon)
            self._watch(mon)  # the FD is edge-triggered: take what came before we watched

    def _socket(self, ctx: zmq.Context, kind: int, info: dict, port: int, hwm: int) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, hwm)
        # Never reconnect: the kernel can write its runtime directory, and a reconnect would
        # follow whatever it put at the socket's path (another session's kernel, say).
        sock.setsockopt(zmq.RECONNECT_IVL, -1)
        sock.connect(f"{info['transport']}://{info['ip']}-{port}")
        return sock

    def send(
        self, msg_type: str, content: dict[str, Any], budget: Budget | None = None
    ) -> tuple[str, asyncio.Queue[dict]]:
        """Send a shell request; the queue receives every reply and IOPub message it causes,
        output only while it fits `budget` (when given)."""
        msg = self.session.msg(msg_type, content)
        msg_id = msg["header"]["msg_id"]
        queue: asyncio.Queue[dict] = asyncio.Queue()
        self._waiters[msg_id] = _Waiter(queue, budget)
        if self.fault is not None:
            queue.put_nowait(DIED)
            return msg_id, queue
        self.session.send(self.shell, msg)
        self._drain(self.shell)  # the send may have consumed the socket's read edge
        return msg_id, queue

    def forget(self, msg_id: str) -> None:
        self._waiters.pop(msg_id, None)

    def broadcast(self, msg: dict) -> None:
        for waiter in self._waiters.values():
            waiter.queue.put_nowait(msg)

    def _drain(self, sock: zmq.Socket) -> None:
        while not self._closed and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._route(frames)
            except ProtocolError as exc:
                self._fail(f"the kernel broke the protocol: {exc}")
                return

    def _watch(self, monitor: zmq.Socket) -> None:
        while not self._closed and monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                event = zmq_monitor.recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._fail(
                    "the kernel's connection dropped (it ended, or sent a message over "
                    f"{self.max_message_bytes} bytes)"
                )
                return

    def _fail(self, reason: str) -> None:
        if self.fault is None and not self._closed:
            self.fault = reason
            log.warning("kernel connection: %s", reason)
            self._on_fault(reason)

    def _route(self, frames: list[bytes]) -> None:
        """Check one message before decoding more of it than its size allows, and hand it to
        whoever waits for its parent (nobody: it is dropped undecoded)."""
        try:
            i = frames.index(DELIM)
            signature, header, parent, metadata, content = frames[i + 1 : i + 6]
        except ValueError:
            raise ProtocolError("a message without its five parts") from None
        if max(len(header), len(parent), len(metadata)) > SMALL_PART_BYTES:
            raise ProtocolError(f"a header over {SMALL_PART_BYTES} bytes")
        waiter = self._waiters.get(str(_object(parent, "parent header").get("msg_id", "")))
        if waiter is None:
            return  # nobody waits (late output of a finished execution, say)
        msg_type = _object(header, "header").get("msg_type")
        if not isinstance(msg_type, str):
            raise ProtocolError("a header without a msg_type")
        if msg_type in OUTPUT_TYPES:
            if waiter.budget is not None and not waiter.budget.charge(len(content)):
                return
        elif msg_type in CONTROL_TYPES:
            if len(content) > CONTROL_BYTES:
                raise ProtocolError(f"a {msg_type} message of {len(content)} bytes")
        else:
            return  # execute_input and the like: nothing the engine uses
        if self.session.auth is not None:
            auth = self.session.auth.copy()
            for part in (header, parent, metadata, content):
                auth.update(part)
            if not hmac.compare_digest(auth.hexdigest().encode(), signature):
                raise ProtocolError("a message with an invalid signature")
        waiter.queue.put_nowait(
            {
                "msg_type": msg_type,
                "header": _object(header, "header"),
                "parent_header": _object(parent, "parent header"),
                "metadata": _object(metadata, "metadata"),
                "content": _object(content, f"{msg_type} content"),
            }
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in (self.shell, self.iopub):
            self._loop.remove_reader(sock.getsockopt(zmq.FD))
            sock.disable_monitor()
        for mon in self._monitors:
            self._loop.remove_reader(mon.getsockopt(zmq.FD))
            mon.close(linger=0)
        for sock in (self.shell, self.iopub):
            sock.close(linger=0)


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
        kernel = cls(proc, backend.config.max_message_bytes)
        try:
            await kernel._wait_ready(timeout)
        except BaseException:
            await kernel.shutdown()
            raise
        return kernel

    async def _wait_ready(self, timeout: float) -> None:
        """Ready means: the shell answers *and* IOPub is subscribed.

        The connection is made once the kernel has bound its sockets (ZMQ must not reconnect,
        see KernelConnection), and made again if the first attempt came too early. PUB/SUB
        drops messages until the subscription reaches the kernel, so a kernel_info reply alone
        would let the first execution's output vanish: kernel_info is repeated until its own
        status message comes back on IOPub.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        info = self.proc.connection_info
        sockets = [Path(f"{info['ip']}-{info[p]}") for p in ("shell_port", "iopub_port")]
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
                self.conn = KernelConnection(info, self._faulted, self.max_message_bytes)
                connected_at = loop.time()
            msg_id, queue = self.conn.send("kernel_info_request", {})
            try:
                async with asyncio.timeout(0.25):
                    while True:
                        msg = await queue.get()
                        if msg is not DIED and msg["msg_type"] == "status":
                            return
                        if msg is DIED:
                            break
            except TimeoutError:
                pass  # ask again: the subscription may not have been there yet
            finally:
                self.conn.forget(msg_id)

    @property
    def alive(self) -> bool:
        return not self.death.done() and self.fault is None

    async def shutdown(self) -> None:
        """Kill the process and release everything; safe to call twice."""
        try:
            await self.proc.kill()
        finally:
            if self.conn is not None:
                self.conn.close()
            await self.proc.cleanup()
            if not self.death.done():
                self.death.cancel()
            with contextlib.suppress(BaseException):
                await self.death
