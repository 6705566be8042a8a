"""One stateful kernel session: execute with a host-enforced deadline, interrupt, restart.

The deadline is the host's, never the code's: at the deadline the kernel is interrupted
(SIGINT to its process group); if it is still busy after a grace period it is killed and a
fresh kernel is started in the same working directory (`kernel_restarted`). A kernel that
dies mid-run yields `status: "died"` and is replaced the same way. State loss is always
reported, never silent.

Concurrency: one execution at a time. A second caller does not queue behind the first; it
gets `SessionBusy` at once (HTTP 409). Agents that send overlapping code to one stateful
session almost always have a bug, and a queue would hide it behind growing latencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernelbox.models import ErrorInfo, Execution

from .backends.base import ExitInfo, KernelBackend
from .capture import CaptureLimits, ImageNamer, OutputCapture
from .errors import SessionBusy, SessionClosed
from .kernel import Kernel

log = logging.getLogger(__name__)

# Called with ("stdout" | "stderr", {"text"}), ("result", Result dict), ("error", ErrorInfo dict)
# as output arrives; used for streaming.
OnEvent = Callable[[str, dict[str, Any]], Awaitable[None] | None]

TIMEOUT_TEXT = "Code execution exceeded the time limit."
STATE_LOST = (
    "The kernel was restarted: all variables, imports and definitions are lost; "
    "files in the working directory are kept."
)


@dataclass
class SessionOptions:
    default_timeout: float = 30.0
    max_timeout: float = 3600.0
    # How long an interrupted kernel may take to stop before it is restarted.
    interrupt_grace: float = 1.0
    # After the execute reply, how long to wait for IOPub to report idle (lost only if
    # a message was dropped, e.g. an oversized one).
    idle_after_reply: float = 1.0
    capture: CaptureLimits = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.capture is None:
            self.capture = CaptureLimits()


class KernelSession:
    def __init__(
        self,
        backend: KernelBackend,
        kernel: Kernel,
        workdir: Path,
        *,
        options: SessionOptions | None = None,
        env: dict[str, str] | None = None,
        session_id: str | None = None,
    ) -> None:
        self.id = session_id or uuid.uuid4().hex
        self.backend = backend
        self.workdir = workdir
        self.options = options or SessionOptions()
        self.env = env or {}
        self.kernel = kernel
        self.namer = ImageNamer.for_workdir(workdir)
        self.execution_count = 0
        self._lock = asyncio.Lock()
        self._restarting: asyncio.Task[None] | None = None
        self._closed = False
        # Set when the kernel died between executions: the next result must say so.
        self._unreported_restart = False

    @classmethod
    async def start(
        cls,
        backend: KernelBackend,
        workdir: Path,
        *,
        options: SessionOptions | None = None,
        env: dict[str, str] | None = None,
    ) -> KernelSession:
        workdir.mkdir(parents=True, exist_ok=True)
        kernel = await Kernel.start(backend, workdir, env)
        return cls(backend, kernel, workdir, options=options, env=env)

    # -- state -----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def status(self) -> str:
        if self._closed:
            return "closed"
        if self._restarting is not None and not self._restarting.done():
            return "restarting"
        return "busy" if self.busy else "idle"

    # -- execute ---------------------------------------------------------------------------

    async def execute(
        self, code: str, timeout: float | None = None, on_event: OnEvent | None = None
    ) -> Execution:
        """Run `code`; always returns an `Execution` unless the session is closed or busy."""
        if timeout is None:
            timeout = self.options.default_timeout
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        timeout = min(float(timeout), self.options.max_timeout)
        if self._closed:
            raise SessionClosed(f"session {self.id} is closed")
        if self._lock.locked():
            raise SessionBusy(f"session {self.id} is already running code")
        async with self._lock:
            restarted = await self._ensure_kernel()
            if not code.strip():
                return Execution(status="ok", kernel_restarted=restarted)
            result = await self._run(code, timeout, on_event)
            if restarted:
                result.kernel_restarted = True
            return result

    async def _ensure_kernel(self) -> bool:
        """Wait out a restart in progress; replace a kernel that died while idle.

        Returns True when the state was lost since the last reported result.
        """
        if self._restarting is not None:
            await self._restarting  # raises KernelStartError if the restart failed
        if not self.kernel.alive:
            info = self.kernel.death.result()
            log.info("session %s: kernel %s while idle; restarting", self.id, info.reason)
            self._unreported_restart = True
            await self._restart_now()
        lost, self._unreported_restart = self._unreported_restart, False
        return lost

    async def _run(self, code: str, timeout: float, on_event: OnEvent | None) -> Execution:
        kernel = self.kernel
        client = kernel.client
        capture = OutputCapture(self.workdir, self.namer, self.options.capture)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + timeout
        msg_id = client.execute(code, silent=False, store_history=True, allow_stdin=False)

        status = "ok"
        reply: dict | None = None
        idle = False
        interrupted_at: float | None = None
        died: ExitInfo | None = None
        iopub_get = asyncio.ensure_future(client.iopub_channel.get_msg())
        shell_get = asyncio.ensure_future(client.shell_channel.get_msg())
        try:
            while not (idle and reply is not None):
                now = loop.time()
                if reply is not None and not idle:
                    # Reply without idle: an IOPub message was lost; do not wait forever.
                    wait_until = min(deadline, now + self.options.idle_after_reply)
                elif interrupted_at is not None:
                    wait_until = interrupted_at + self.options.interrupt_grace
                else:
                    wait_until = deadline
                done, _ = await asyncio.wait(
                    {iopub_get, shell_get, kernel.death},
                    timeout=max(wait_until - now, 0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if iopub_get in done:
                    msg = iopub_get.result()
                    iopub_get = asyncio.ensure_future(client.iopub_channel.get_msg())
                    if msg["parent_header"].get("msg_id") == msg_id:
                        idle = idle or _is_idle(msg)
                        await self._take(msg, capture, on_event)
                    continue  # drain IOPub before acting on a reply or a death
                if shell_get in done:
                    msg = shell_get.result()
                    shell_get = asyncio.ensure_future(client.shell_channel.get_msg())
                    if msg["parent_header"].get("msg_id") == msg_id:
                        reply = msg
                    continue
                if kernel.death in done:
                    died = kernel.death.result()
                    await self._drain(client, msg_id, capture, on_event)
                    break
                # A wait ran out.
                if reply is not None and not idle:
                    break
                if interrupted_at is None:
                    status = "timeout"
                    interrupted_at = loop.time()
                    await kernel.proc.send_signal(signal.SIGINT)
                    continue
                # Interrupting did not stop it within the grace period.
                break
        finally:
            iopub_get.cancel()
            shell_get.cancel()

        duration_ms = (loop.time() - started) * 1000
        count = reply["content"].get("execution_count") if reply else None
        if count:
            self.execution_count = count
        restarted = False
        if died is not None:
            status = "died"
            reason = "out of memory" if died.oom else died.reason
            capture.replace_error(
                ErrorInfo(
                    name="KernelDied",
                    value=f"The kernel died while running this code ({reason}). {STATE_LOST}",
                )
            )
            restarted = True
            self._schedule_restart()
        elif status == "timeout":
            capture.replace_error(
                ErrorInfo(name="TimeoutError", value=f"{TIMEOUT_TEXT} ({timeout:g} s)")
            )
            if not (idle or reply is not None):
                # Still running after SIGINT and the grace period: only a restart stops it.
                restarted = True
                capture.replace_error(
                    ErrorInfo(
                        name="TimeoutError",
                        value=f"{TIMEOUT_TEXT} ({timeout:g} s) "
                        f"Interrupting did not stop it. {STATE_LOST}",
                    )
                )
                self._schedule_restart()
        elif capture.has_error or (reply is not None and reply["content"]["status"] == "error"):
            status = "error"
        if reply is not None and not idle and died is None and status != "timeout":
            capture.note_lost_output()
        return capture.build(
            status,  # type: ignore[arg-type]
            execution_count=count,
            duration_ms=duration_ms,
            kernel_restarted=restarted,
        )

    async def _take(self, msg: dict, capture: OutputCapture, on_event: OnEvent | None) -> None:
        event = capture.feed(msg)
        if on_event is not None and event is not None:
            maybe = on_event(*event)
            if asyncio.iscoroutine(maybe):
                await maybe

    async def _drain(self, client, msg_id: str, capture: OutputCapture, on_event) -> None:
        """Take what a dead kernel sent before it died and that is already queued here."""
        with contextlib.suppress(Exception):
            while True:
                msg = await client.iopub_channel.get_msg(timeout=0.05)
                if msg["parent_header"].get("msg_id") == msg_id:
                    await self._take(msg, capture, on_event)

    async def run_hidden(self, code: str, timeout: float = 10.0) -> None:
        """Run set-up code silently (no history, no execution count, no output kept)."""
        async with self._lock:
            await self._ensure_kernel()
            client = self.kernel.client
            msg_id = client.execute(code, silent=True, store_history=False, allow_stdin=False)
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                reply = await client.shell_channel.get_msg(timeout=max(remaining, 0.001))
                if reply["parent_header"].get("msg_id") == msg_id:
                    if reply["content"]["status"] != "ok":
                        raise RuntimeError(f"set-up code failed: {reply['content'].get('evalue')}")
                    return

    # -- control ---------------------------------------------------------------------------

    async def interrupt(self) -> bool:
        """Send SIGINT if code is running; returns whether there was anything to interrupt."""
        if not self.busy or not self.kernel.alive:
            return False
        await self.kernel.proc.send_signal(signal.SIGINT)
        return True

    async def restart(self) -> None:
        """Fresh kernel, same working directory. Running code (if any) ends as `died`."""
        if self._closed:
            raise SessionClosed(f"session {self.id} is closed")
        if self._restarting is not None and not self._restarting.done():
            await self._restarting
            return
        self._schedule_restart()
        assert self._restarting is not None
        await self._restarting

    def _schedule_restart(self) -> None:
        if self._restarting is None or self._restarting.done():
            self._restarting = asyncio.get_running_loop().create_task(self._restart_now())

    async def _restart_now(self) -> None:
        old = self.kernel
        await old.shutdown()
        self.kernel = await Kernel.start(self.backend, self.workdir, self.env)
        self.execution_count = 0

    async def close(self) -> None:
        """Stop the kernel; the working directory is left to whoever created it."""
        if self._closed:
            return
        self._closed = True
        if self._restarting is not None and not self._restarting.done():
            with contextlib.suppress(BaseException):
                await self._restarting
        await self.kernel.shutdown()


def _is_idle(msg: dict) -> bool:
    return msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle"
