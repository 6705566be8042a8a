"""One stateful kernel session: execute with a host-enforced deadline, interrupt, restart.

The deadline is the host's, never the code's: at the deadline the kernel is interrupted
(SIGINT to its process group); if it is still busy after a grace period it is killed and a
fresh kernel is started in the same working directory (`kernel_restarted`). A kernel that
dies mid-run yields `status: "died"` and is replaced the same way; so does one that stops
answering properly (a request without a reply, an output channel that went silent, a message
that breaks the protocol), since nothing it says can be relied on any more. State loss is
always reported, never silent.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernelbox_wire.models import ErrorInfo, Execution

from . import files as session_files
from . import quota
from .backends.base import ExitInfo, KernelBackend
from .capture import CaptureLimits, ImageNamer, OutputCapture
from .errors import KernelStartError, PauseFailed, SessionBusy, SessionClosed
from .history import SessionHistory
from .kernel import DIED, Budget, Kernel, ProtocolError
from .namespace import RESTORE_CODE, SAVE_CODE, STATE_FILE, BadReport, Report, parse_report
from .workspace import Workspace

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
    # After IOPub reported idle, how long to wait for the execute reply before the kernel
    # counts as broken (an honest kernel sends both at once).
    reply_after_idle: float = 5.0
    # How long saving (pause) or restoring (resume) the variables may take.
    pause_timeout: float = 120.0
    capture: CaptureLimits = field(default_factory=CaptureLimits)


@dataclass
class _Run:
    """What one execution has seen of the kernel so far."""

    reply: dict | None = None
    idle: bool = False
    idle_at: float = 0.0
    saw_iopub: bool = False
    interrupted_at: float | None = None
    died: ExitInfo | None = None
    #: why the kernel cannot be trusted any more (it is replaced)
    broken: str | None = None
    over_quota: int | None = None


class KernelSession:
    def __init__(
        self,
        backend: KernelBackend,
        kernel: Kernel,
        workspace: Workspace,
        *,
        options: SessionOptions | None = None,
        env: dict[str, str] | None = None,
        session_id: str | None = None,
    ) -> None:
        self.id = session_id or uuid.uuid4().hex
        self.backend = backend
        #: the working directory, as the engine and the service reach it
        self.workspace = workspace
        self.options = options or SessionOptions()
        self.env = env or {}
        self.kernel = kernel
        self.namer = ImageNamer()
        self.disk = quota.DiskUsage()
        self.execution_count = 0
        #: what ran and what it showed, for the notebook export (bounded)
        self.history = SessionHistory()
        self._lock = asyncio.Lock()
        self._restarting: asyncio.Task[None] | None = None
        # Why state was lost between executions, for the next execution to say.
        self._notice: str | None = None
        # Paused: what was saved (the kernel is stopped until the next execution).
        self._paused: Report | None = None
        self._closed = False
        #: called when what a record of the session holds changes (its kernel, its pause)
        self.on_change: Callable[[], None] | None = None

    @classmethod
    async def start(
        cls,
        backend: KernelBackend,
        workdir: Path,
        *,
        options: SessionOptions | None = None,
        env: dict[str, str] | None = None,
    ) -> KernelSession:
        """A session of its own in `workdir` (made if missing): for tests and benchmarks; the
        service's sessions come from the pool (see SessionManager)."""
        workdir.mkdir(parents=True, exist_ok=True)
        kernel = await Kernel.start(backend, workdir, env)
        workspace = Workspace(workdir, session_files.default_io(), uuid.uuid4().hex)
        workspace.adopt(kernel.proc)
        return cls(backend, kernel, workspace, options=options, env=env)

    def restored(self, execution_count: int, paused: Report | None, notice: str | None) -> None:
        """Take up the state of a session restored from its record (store.py): paused with
        `paused` saved, or with `notice` for the next execution to give (its kernel was
        lost with the service, so state was too)."""
        self.execution_count = execution_count
        self._paused = paused
        self._notice = notice

    def describe_kernel(self) -> dict[str, Any] | None:
        """Where the kernel runs (KernelProcess.describe), None when none does."""
        if self._paused is not None or not self.kernel.running or not self.kernel.alive:
            return None
        return self.kernel.proc.describe()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    @property
    def workdir(self) -> Path:
        """The working directory's host path: for tests and for the backend only."""
        return self.workspace.root

    # -- state -----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def status(self) -> str:
        if self._closed:
            return "closed"
        if self._paused is not None:
            return "paused"
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
            resumed = await self._resume() if self._paused is not None else None
            lost = await self._ensure_kernel()
            if not code.strip():
                result = Execution(status="ok")
            else:
                result = await self._run(code, timeout, on_event)
            if lost:
                result.kernel_restarted = True
                result.notes.insert(0, lost)
            if resumed is not None:
                result.resumed = True
                result.not_restored = resumed.failed
                result.notes.insert(0, _resume_note(resumed))
            if code.strip():
                self.history.add(code, result)
            return result

    async def _ensure_kernel(self) -> str | None:
        """Wait out a restart in progress; replace a kernel that died or broke while idle.

        Returns why state was lost when no earlier result reported it. A failed restart is
        tried once more here, and raises KernelStartError if it fails again.
        """
        notice, self._notice = self._notice, None
        if self._restarting is not None:
            task, self._restarting = self._restarting, None
            try:
                await task
            except KernelStartError as exc:
                log.warning("session %s: restart failed (%s); trying again", self.id, exc)
                await self._restart_now()
                return notice  # the execution that caused the restart reported it
        if self.kernel.alive and self.kernel.running:
            return notice
        info = await self.kernel.end()
        log.info("session %s: kernel %s while idle; restarting", self.id, info.reason)
        await self._restart_now()
        return notice or f"The kernel stopped between executions ({info.reason}). {STATE_LOST}"

    async def _run(self, code: str, timeout: float, on_event: OnEvent | None) -> Execution:
        kernel = self.kernel
        assert kernel.conn is not None
        capture = OutputCapture(self.workspace, self.namer, self.options.capture)
        budget = Budget(self.options.capture.max_execution_bytes)
        loop = asyncio.get_running_loop()
        started = loop.time()
        run = _Run()
        msg_id, queue = kernel.conn.send("execute_request", execute_content(code), budget)
        watchdog = self._watch_disk(kernel, run)
        try:
            await self._collect(kernel, queue, capture, on_event, started + timeout, run)
        finally:
            kernel.conn.forget(msg_id)
            if watchdog is not None:
                watchdog.cancel()
        capture.note_budget(budget)
        return self._outcome(run, capture, timeout, (loop.time() - started) * 1000)

    async def _collect(
        self,
        kernel: Kernel,
        queue: asyncio.Queue[dict],
        capture: OutputCapture,
        on_event: OnEvent | None,
        deadline: float,
        run: _Run,
    ) -> None:
        """Take the kernel's messages for this execution until it is over, one way or another."""
        loop = asyncio.get_running_loop()
        while not (run.idle and run.reply is not None):
            try:
                async with asyncio.timeout_at(self._wait_until(run, deadline, loop.time())):
                    msg = await queue.get()
            except TimeoutError:
                if await self._on_quiet(kernel, run, loop.time()):
                    continue
                return  # idle lost, or SIGINT did not stop it within the grace period
            if msg is DIED:
                run.died = await kernel.end()
                await self._take_late(queue, capture, on_event, run)
                return
            if self._took_control(msg, run, loop.time()):
                continue
            await self._take(msg, capture, on_event, run)
            if run.broken:
                return

    def _wait_until(self, run: _Run, deadline: float, now: float) -> float:
        """How long the next message may take, given what the execution has seen so far."""
        opts = self.options
        if run.reply is not None:  # reply without idle: an IOPub message was lost
            return min(deadline, now + opts.idle_after_reply)
        if run.idle:  # idle without reply: the reply is late, or never coming
            return run.idle_at + opts.reply_after_idle
        if run.interrupted_at is not None:
            return run.interrupted_at + opts.interrupt_grace
        return deadline

    async def _on_quiet(self, kernel: Kernel, run: _Run, now: float) -> bool:
        """No message in time: whether to go on waiting (after interrupting at the deadline)."""
        if run.reply is not None and not run.saw_iopub:
            run.broken = "its output channel went silent"
        elif run.idle and run.reply is None:
            run.broken = "it did not answer the execute request"
        elif run.reply is None and run.interrupted_at is None:
            run.interrupted_at = now
            await kernel.proc.send_signal(signal.SIGINT)
            return True
        return False

    async def _take_late(
        self,
        queue: asyncio.Queue[dict],
        capture: OutputCapture,
        on_event: OnEvent | None,
        run: _Run,
    ) -> None:
        """What arrived before the kernel's end."""
        while not queue.empty():
            if (late := queue.get_nowait()) is not DIED and not run.broken:
                await self._take(late, capture, on_event, run)

    @staticmethod
    def _took_control(msg: dict, run: _Run, now: float) -> bool:
        """Note the reply and the status messages; whether `msg` was one (no output)."""
        if msg["msg_type"] == "execute_reply":
            run.reply = msg
            return True
        run.saw_iopub = True
        if msg["msg_type"] == "status":
            if not run.idle and msg["content"].get("execution_state") == "idle":
                run.idle, run.idle_at = True, now
            return True
        return False

    async def _take(
        self, msg: dict, capture: OutputCapture, on_event: OnEvent | None, run: _Run
    ) -> None:
        try:
            event = await capture.feed(msg)
        except ProtocolError as exc:
            run.broken = f"it broke the protocol: {exc}"
            return
        if on_event is not None and event is not None:
            maybe = on_event(*event)
            if asyncio.iscoroutine(maybe):
                await maybe

    def _outcome(
        self, run: _Run, capture: OutputCapture, timeout: float, duration_ms: float
    ) -> Execution:
        """The Execution, and the kernel's replacement where it cannot go on."""
        reply = run.reply["content"] if run.reply is not None else None
        count = self._take_count(reply)
        status, restarted = "ok", False
        if run.died is not None or run.broken is not None:
            status, restarted = "died", True
            self._kernel_lost(run, capture)
        elif run.interrupted_at is not None:
            status = "timeout"
            restarted = self._timed_out(run, reply, capture, timeout)
        elif run.over_quota is not None:
            status = "error"
            self._over_quota(run.over_quota, capture)
        elif capture.has_error:
            status = "error"
        elif isinstance(reply, dict) and reply.get("status") == "error":
            status = "error"
            with contextlib.suppress(ProtocolError):  # no usable error in it: status says it
                capture.take_error(reply)
        if reply is not None and not run.idle and status in ("ok", "error"):
            capture.note_lost_output()
        return capture.build(
            status,  # type: ignore[arg-type]
            execution_count=count,
            duration_ms=duration_ms,
            kernel_restarted=restarted,
        )

    def _take_count(self, reply: dict | None) -> int | None:
        count = reply.get("execution_count") if reply else None
        if isinstance(count, int) and count > 0:
            self.execution_count = count
            return count
        return None

    def _kernel_lost(self, run: _Run, capture: OutputCapture) -> None:
        """The kernel died or broke: say so, and replace it."""
        if run.died is not None:
            reason = "out of memory" if run.died.oom else run.died.reason
            value = f"The kernel died while running this code ({reason}). {STATE_LOST}"
        else:
            value = f"The kernel stopped working properly ({run.broken}). {STATE_LOST}"
            log.warning("session %s: kernel replaced: %s", self.id, run.broken)
        capture.replace_error(ErrorInfo(name="KernelDied", value=value))
        self._schedule_restart()

    def _timed_out(
        self, run: _Run, reply: dict | None, capture: OutputCapture, timeout: float
    ) -> bool:
        """The deadline passed: say so; whether the kernel is replaced (SIGINT did not stop
        it within the grace period, and only a restart does)."""
        value = f"{TIMEOUT_TEXT} ({timeout:g} s)"
        restarted = not (run.idle or reply is not None)
        if restarted:
            value += f" Interrupting did not stop it. {STATE_LOST}"
            self._schedule_restart()
        capture.replace_error(ErrorInfo(name="TimeoutError", value=value))
        return restarted

    def _over_quota(self, size: int, capture: OutputCapture) -> None:
        limit = self.backend.config.limits.disk_bytes
        capture.replace_error(
            ErrorInfo(
                name="DiskQuotaExceeded",
                value=f"The working directory holds {size} bytes, over its limit "
                f"of {limit} bytes; the code was interrupted. Delete files to go on.",
            )
        )

    def _watch_disk(self, kernel: Kernel, run: _Run) -> asyncio.Task[None] | None:
        """Where no filesystem enforces the disk limit: measure while the code runs."""
        limit = self.backend.config.limits.disk_bytes
        if not limit or self.workspace.own_filesystem:
            return None

        async def stop(size: int) -> None:
            run.over_quota = size
            await kernel.proc.send_signal(signal.SIGINT)

        return asyncio.get_running_loop().create_task(
            quota.watch(self.workspace, limit, self.disk, stop)
        )

    async def check_disk(self) -> None:
        """Between executions, where no filesystem enforces the disk limit: a directory past
        its limit that grew since last measured has a writer still running (a background
        thread or process): the kernel is replaced, and the next execution says why."""
        limit = self.backend.config.limits.disk_bytes
        if not limit or self.workspace.own_filesystem or self.busy or self._closed:
            return
        if self._paused is not None:  # no kernel runs to be writing
            return
        size = await self.disk.over(self.workspace, limit)
        if size is not None and not self.busy and not self._closed:
            log.warning("session %s: %d bytes on disk while idle; restarting", self.id, size)
            self._notice = (
                f"The working directory grew to {size} bytes, over its limit of {limit} bytes, "
                f"while no code of this session was running (a background thread or process "
                f"kept writing). {STATE_LOST} Delete files to go on."
            )
            self._schedule_restart()

    async def run_hidden(self, code: str, timeout: float = 10.0) -> None:
        """Run set-up code silently (no history, no execution count, no output kept)."""
        async with self._lock:
            if self._paused is not None:
                await self._resume()
            await self._ensure_kernel()
            await self._silently(code, timeout)

    async def _silently(
        self, code: str, timeout: float, expressions: dict[str, str] | None = None
    ) -> dict:
        """Run code silently on the current kernel; its execute_reply (checked: ok)."""
        assert self.kernel.conn is not None
        content = execute_content(code, silent=True)
        content["user_expressions"] = expressions or {}
        # What the reply may bring in: the expressions' text (a report) and no more.
        msg_id, queue = self.kernel.conn.send("execute_request", content, Budget(2 * 1024**2))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    msg = await queue.get()
                    if msg is DIED:
                        raise KernelStartError("the kernel died running set-up code")
                    if msg["msg_type"] == "execute_reply":
                        if msg["content"].get("status") != "ok":
                            raise KernelStartError(
                                f"set-up code failed: {msg['content'].get('evalue')}"
                            )
                        return msg
        except TimeoutError:
            raise KernelStartError("the kernel did not run its set-up code") from None
        finally:
            self.kernel.conn.forget(msg_id)

    # -- pause and resume ------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused is not None

    async def pause(self) -> Report:
        """Save the variables into the working directory and stop the kernel, freeing its
        memory; the next execution resumes in a fresh kernel with them restored (and says
        which could not be). Files are kept. Pausing a paused session changes nothing.
        PauseFailed (the kernel keeps running) when the variables cannot be saved."""
        if self._closed:
            raise SessionClosed(f"session {self.id} is closed")
        if self._lock.locked():
            raise SessionBusy(f"session {self.id} is running code")
        async with self._lock:
            if self._paused is not None:
                return self._paused
            lost = await self._ensure_kernel()
            if lost:  # the next execution must still say that state was lost before
                self._notice = lost
            try:
                reply = await self._silently(
                    SAVE_CODE, self.options.pause_timeout, {"report": "__kernelbox_pause()"}
                )
                report = parse_report(reply, "report")
            except (KernelStartError, BadReport) as exc:
                raise PauseFailed(f"the session's variables could not be saved: {exc}") from None
            await self.kernel.shutdown()
            self._paused = report
            log.info("session %s paused (%d names saved)", self.id, len(report.names))
            self._changed()
            return report

    async def _resume(self) -> Report:
        """A fresh kernel with the paused variables restored; what could not be, with why
        (names the pause could not save included). Still paused if no kernel starts."""
        assert self._paused is not None
        saved = self._paused
        self.kernel = await Kernel.start(self.backend, self.workspace.root, self.env)
        self.workspace.adopt(self.kernel.proc)
        self._paused = None
        self._changed()
        try:
            reply = await self._silently(
                RESTORE_CODE, self.options.pause_timeout, {"report": "__kernelbox_resume()"}
            )
            report = parse_report(reply, "report")
        except (KernelStartError, BadReport) as exc:
            reason = f"not restored: {exc}"
            report = Report(failed={name: reason for name in saved.names})
            self._schedule_restart()  # a kernel that failed its restore is not trusted
        if report.missing:
            reason = "not restored: the saved state was not in the working directory"
            report = Report(failed={name: reason for name in saved.names})
        report.failed = {**saved.failed, **report.failed}
        log.info("session %s resumed (%d names not restored)", self.id, len(report.failed))
        return report

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
        try:
            await old.shutdown()
        except Exception:
            # The new kernel must not depend on the old one going quietly (a container the
            # engine is slow to remove after a fork bomb, say); the backend still owns it.
            log.exception("session %s: stopping the old kernel failed", self.id)
        self.kernel = await Kernel.start(self.backend, self.workspace.root, self.env)
        self.workspace.adopt(self.kernel.proc)
        self.execution_count = 0
        if self._paused is not None:  # a restart forgets the paused variables
            self._paused = None
            with contextlib.suppress(FileNotFoundError):
                await self.workspace.delete(STATE_FILE)
        self._changed()

    async def detach(self) -> bool:
        """Close the session here but leave its kernel running where the backend can (for
        the next service to re-attach to); whether it was left running."""
        if self._closed:
            return False
        self._closed = True
        if self._restarting is not None and not self._restarting.done():
            with contextlib.suppress(BaseException):
                await self._restarting
        if self._paused is not None or not self.kernel.running:
            await self.kernel.shutdown()
            return False
        return await self.kernel.detach(self.backend)

    async def close(self) -> None:
        """Stop the kernel; the working directory is left to whoever created it."""
        if self._closed:
            return
        self._closed = True
        if self._restarting is not None and not self._restarting.done():
            with contextlib.suppress(BaseException):
                await self._restarting
        await self.kernel.shutdown()


def _resume_note(report: Report) -> str:
    if not report.failed:
        return "The session was resumed after a pause: every variable was restored."
    lost = "; ".join(f"{name} ({why})" for name, why in sorted(report.failed.items()))
    return f"The session was resumed after a pause; not restored: {lost}"


def execute_content(code: str, silent: bool = False) -> dict:
    return {
        "code": code,
        "silent": silent,
        "store_history": not silent,
        "user_expressions": {},
        "allow_stdin": False,  # input() raises at once instead of waiting for nobody
        "stop_on_error": False,
    }
