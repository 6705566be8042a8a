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
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.session import Session

from .backends.base import ExitInfo, KernelBackend, KernelProcess
from .errors import KernelStartError

log = logging.getLogger(__name__)

DELIM = b"<IDS|MSG>"
# Put into every waiting queue when the kernel process ends.
DIED = {"msg_type": "__died__", "content": {}, "metadata": {}, "parent_header": {}}
# Oversized messages (a malicious kernel's) are dropped by ZMQ before they reach Python.
MAX_MESSAGE_BYTES = 64 * 1024**2


class KernelConnection:
    """Shell and IOPub sockets to one kernel; messages dispatched by parent msg_id."""

    def __init__(self, info: dict[str, Any]) -> None:
        for port in (info["shell_port"], info["iopub_port"]):
            path = f"{info['ip']}-{port}"
            if info["transport"] == "ipc" and not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise KernelStartError(f"{path} is not a socket")
        self.session = Session(
            key=info["key"].encode(),
            signature_scheme=info["signature_scheme"],
            username="kernelbox",
        )
        self._loop = asyncio.get_running_loop()
        ctx = zmq.Context.instance()
        self.shell = self._socket(ctx, zmq.DEALER, info, info["shell_port"])
        self.iopub = self._socket(ctx, zmq.SUB, info, info["iopub_port"])
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self._waiters: dict[str, asyncio.Queue[dict]] = {}
        self._closed = False
        for sock in (self.shell, self.iopub):
            self._loop.add_reader(sock.getsockopt(zmq.FD), self._drain, sock)

    @staticmethod
    def _socket(ctx: zmq.Context, kind: int, info: dict, port: int) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        # Never reconnect: the kernel can write its runtime directory, and a reconnect would
        # follow whatever it put at the socket's path (another session's kernel, say).
        sock.setsockopt(zmq.RECONNECT_IVL, -1)
        sock.connect(f"{info['transport']}://{info['ip']}-{port}")
        return sock

    def send(self, msg_type: str, content: dict[str, Any]) -> tuple[str, asyncio.Queue[dict]]:
        """Send a shell request; the queue receives every reply and IOPub message it causes."""
        msg = self.session.msg(msg_type, content)
        msg_id = msg["header"]["msg_id"]
        queue: asyncio.Queue[dict] = asyncio.Queue()
        self._waiters[msg_id] = queue
        self.session.send(self.shell, msg)
        self._drain(self.shell)  # the send may have consumed the socket's read edge
        return msg_id, queue

    def forget(self, msg_id: str) -> None:
        self._waiters.pop(msg_id, None)

    def broadcast(self, msg: dict) -> None:
        for queue in self._waiters.values():
            queue.put_nowait(msg)

    def _drain(self, sock: zmq.Socket) -> None:
        while not self._closed and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = self._parse(frames)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("dropped a malformed kernel message: %s", exc)
                continue
            queue = self._waiters.get(msg["parent_header"].get("msg_id", ""))
            if queue is not None:
                queue.put_nowait(msg)

    def _parse(self, frames: list[bytes]) -> dict[str, Any]:
        """Check the signature and decode the four JSON parts (no date parsing)."""
        i = frames.index(DELIM)
        signature, header, parent, metadata, content = frames[i + 1 : i + 6]
        if self.session.auth is not None:
            auth = self.session.auth.copy()
            for part in (header, parent, metadata, content):
                auth.update(part)
            if not hmac.compare_digest(auth.hexdigest().encode(), signature):
                raise ValueError("invalid signature")
        head = json.loads(header)
        return {
            "msg_type": head["msg_type"],
            "header": head,
            "parent_header": json.loads(parent),
            "metadata": json.loads(metadata),
            "content": json.loads(content),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in (self.shell, self.iopub):
            self._loop.remove_reader(sock.getsockopt(zmq.FD))
            sock.close(linger=0)


class Kernel:
    """One kernel process plus its connection. Replaced as a whole on restart."""

    def __init__(self, proc: KernelProcess) -> None:
        self.proc = proc
        self.conn: KernelConnection | None = None  # made once the kernel's sockets exist
        self.death: asyncio.Task[ExitInfo] = asyncio.get_running_loop().create_task(proc.wait())
        self.death.add_done_callback(lambda _: self.conn and self.conn.broadcast(DIED))

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
        kernel = cls(proc)
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
                raise KernelStartError(
                    f"the kernel {self.death.result().reason} during start-up; "
                    f"its log ends with: {self.proc.log_tail()!r}"
                )
            if self.conn is None or loop.time() - connected_at > 2.0:
                if not all(s.exists() for s in sockets):
                    await asyncio.sleep(0.02)
                    continue
                if self.conn is not None:
                    self.conn.close()
                self.conn = KernelConnection(info)
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
        return not self.death.done()

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
