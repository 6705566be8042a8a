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

from . import quota
from .backends.base import ExitInfo, KernelBackend
from .capture import CaptureLimits, ImageNamer, OutputCapture
from .errors import KernelStartError, SessionBusy, SessionClosed
from .kernel import DIED, Kernel

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
        self.disk = quota.DiskUsage()
        self.execution_count = 0
        self._lock = asyncio.Lock()
        self._restarting: asyncio.Task[None] | None = None
        self._closed = False

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

        Returns True when state was lost that no earlier result reported (a death between
        executions). A failed restart is tried once more here, and raises if it fails again.
        """
        if self._restarting is not None:
            task, self._restarting = self._restarting, None
            try:
                await task
            except KernelStartError as exc:
                log.warning("session %s: restart failed (%s); trying again", self.id, exc)
                await self._restart_now()
                return False  # the execution that caused the restart reported it
        if self.kernel.alive:
            return False
        info = self.kernel.death.result()
        log.info("session %s: kernel %s while idle; restarting", self.id, info.reason)
        await self._restart_now()
        return True

    async def _run(self, code: str, timeout: float, on_event: OnEvent | None) -> Execution:
        kernel = self.kernel
        capture = OutputCapture(
            self.workdir, self.namer, self.options.capture, owner=kernel.proc.file_owner
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + timeout
        msg_id, queue = kernel.conn.send("execute_request", execute_content(code))
        over_quota: list[int] = []

        async def stop_for_quota(size: int) -> None:
            over_quota.append(size)
            await kernel.proc.send_signal(signal.SIGINT)

        disk_limit = self.backend.config.limits.disk_bytes
        watchdog = (
            loop.create_task(quota.watch(self.workdir, disk_limit, self.disk, stop_for_quota))
            if disk_limit
            else None
        )

        status = "ok"
        reply: dict | None = None
        idle = False
        interrupted_at: float | None = None
        died: ExitInfo | None = None
        try:
            while not (idle and reply is not None):
                if reply is not None:
                    # Reply without idle: an IOPub message was lost; do not wait forever.
                    wait_until = min(deadline, loop.time() + self.options.idle_after_reply)
                elif interrupted_at is not None:
                    wait_until = interrupted_at + self.options.interrupt_grace
                else:
                    wait_until = deadline
                try:
                    async with asyncio.timeout_at(wait_until):
                        msg = await queue.get()
                except TimeoutError:
                    if reply is not None or interrupted_at is not None:
                        break  # idle lost, or SIGINT did not stop it within the grace period
                    status = "timeout"
                    interrupted_at = loop.time()
                    await kernel.proc.send_signal(signal.SIGINT)
                    continue
                if msg is DIED:
                    died = kernel.death.result()
                    await asyncio.sleep(0.05)  # let the readers hand over what arrived last
                    while not queue.empty():
                        if (late := queue.get_nowait()) is not DIED:
                            await self._take(late, capture, on_event)
                    break
                if msg["msg_type"] == "execute_reply":
                    reply = msg
                    continue
                idle = idle or _is_idle(msg)
                await self._take(msg, capture, on_event)
        finally:
            kernel.conn.forget(msg_id)
            if watchdog is not None:
                watchdog.cancel()

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
            value = f"{TIMEOUT_TEXT} ({timeout:g} s)"
            if not (idle or reply is not None):
                # Still running after SIGINT and the grace period: only a restart stops it.
                restarted = True
                value += f" Interrupting did not stop it. {STATE_LOST}"
                self._schedule_restart()
            capture.replace_error(ErrorInfo(name="TimeoutError", value=value))
        elif over_quota:
            status = "error"
            capture.replace_error(
                ErrorInfo(
                    name="DiskQuotaExceeded",
                    value=f"The working directory holds {over_quota[0]} bytes, over its limit "
                    f"of {disk_limit} bytes; the code was interrupted. Delete files to go on.",
                )
            )
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

    async def run_hidden(self, code: str, timeout: float = 10.0) -> None:
        """Run set-up code silently (no history, no execution count, no output kept)."""
        async with self._lock:
            await self._ensure_kernel()
            msg_id, queue = self.kernel.conn.send(
                "execute_request", execute_content(code, silent=True)
            )
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        msg = await queue.get()
                        if msg is DIED:
                            raise RuntimeError("the kernel died running set-up code")
                        if msg["msg_type"] == "execute_reply":
                            if msg["content"]["status"] != "ok":
                                raise RuntimeError(
                                    f"set-up code failed: {msg['content'].get('evalue')}"
                                )
                            return
            finally:
                self.kernel.conn.forget(msg_id)

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
        await self._schedule_restart()

    def _schedule_restart(self) -> asyncio.Task[None]:
        """Start a restart unless one is under way; either way, the task doing it."""
        if self._restarting is None or self._restarting.done():
            self._restarting = asyncio.get_running_loop().create_task(self._restart_now())
        return self._restarting

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


def execute_content(code: str, silent: bool = False) -> dict:
    return {
        "code": code,
        "silent": silent,
        "store_history": not silent,
        "user_expressions": {},
        "allow_stdin": False,  # input() raises at once instead of waiting for nobody
        "stop_on_error": False,
    }


def _is_idle(msg: dict) -> bool:
    return msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle"
