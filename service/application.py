"""The application layer: the operations every protocol offers, over the engine.

HTTP routes, the tool endpoint, the SandboxFusion routes (and any protocol to come) are thin
adapters that translate their own requests into these calls and the answers back. What a
caller may do (its share, the size of its code), what an Execution carries when it leaves
(image URLs, a rendering) and what is counted (metrics) is decided here once. Nothing here
knows of HTTP: the adapters pass in what they know of the caller (its owner id, the base URL
its links should use).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from kernelbox_server.sandbox.errors import SandboxError
from kernelbox_server.sandbox.forkserver import RunRequest, RunResult
from kernelbox_server.sandbox.manager import NotebookRun
from kernelbox_server.sandbox.session import OnEvent
from kernelbox_wire.models import (
    CreateSessionRequest,
    ErrorInfo,
    ExecuteRequest,
    Execution,
    Format,
    OutputRef,
    Session,
    ToolCallRequest,
    ToolCallResponse,
    render_options,
)
from kernelbox_wire.render import image_base64, render_message, render_text
from kernelbox_wire.tools import InvalidArguments, extract_code

from .engine import Engine, Files
from .metrics import Metrics
from .settings import Settings


class CodeTooLarge(SandboxError):
    """The code is longer than the service takes."""


class Application:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        #: this machine's engine, or the cluster's (the Ray mode): the same calls either way
        self.engine = engine
        self.metrics = metrics

    # -- sessions ---------------------------------------------------------------------------

    async def create_session(self, owner: str, request: CreateSessionRequest) -> Session:
        return await self.engine.create(
            owner, idle_timeout=request.idle_timeout, env=request.env, metadata=request.metadata
        )

    async def list_sessions(self, owner: str) -> list[Session]:
        return await self.engine.list(owner)

    async def get_session(self, session_id: str, owner: str) -> Session:
        return await self.engine.get(session_id, owner)

    async def delete_session(self, session_id: str, owner: str) -> None:
        await self.engine.delete(session_id, owner)

    async def check_execute(self, session_id: str, owner: str, code: str) -> None:
        """Raise now what `execute` would refuse at once (a stream cannot answer it later)."""
        self.check_code(code)
        await self.engine.check_idle(session_id, owner)

    async def execute(
        self,
        session_id: str,
        owner: str,
        request: ExecuteRequest,
        *,
        base_url: str,
        on_event: OnEvent | None = None,
    ) -> Execution:
        """Run code in the session; variables persist between calls."""
        self.check_code(request.code)
        started = time.perf_counter()
        execution = await self.engine.execute(
            session_id, owner, request.code, request.timeout, on_event
        )
        return self._finish(
            execution, started, fmt=request.format, base_url=base_url, session_id=session_id
        )

    async def interrupt(self, session_id: str, owner: str) -> bool:
        return await self.engine.interrupt(session_id, owner)

    async def restart(self, session_id: str, owner: str) -> Session:
        return await self.engine.restart(session_id, owner)

    async def pause(self, session_id: str, owner: str) -> Session:
        """Free the session's kernel, keeping its variables and files for the next execute."""
        return await self.engine.pause(session_id, owner)

    def files(self, session_id: str, owner: str) -> Files:
        """The session's working directory, as the host may reach it (bounded, off the loop)."""
        return self.engine.files(session_id, owner)

    async def notebook(self, session_id: str, owner: str) -> str:
        """The session's history as an .ipynb: its cells in order with their outputs."""
        return await self.engine.notebook(session_id, owner)

    # -- one-shot runs ----------------------------------------------------------------------

    async def run_once(
        self, owner: str, request: ExecuteRequest, *, on_event: OnEvent | None = None
    ) -> Execution:
        """Stateless: nothing of this run is visible to any other. Images come back as data
        URLs (the run keeps no files)."""
        self.check_code(request.code)
        started = time.perf_counter()
        execution = await self.engine.run_once(owner, request.code, request.timeout, on_event)
        return self._finish(execution, started, fmt=request.format)

    async def run_program(self, owner: str, request: RunRequest) -> RunResult:
        """`request.code` as a fresh python program, on the fork server."""
        self.check_code(request.code)
        started = time.perf_counter()
        try:
            result = await self.engine.run_program(owner, request)
        except Exception:
            self.metrics.observe("error", time.perf_counter() - started)
            raise
        status = (
            "timeout" if result.status == "timeout" else "ok" if result.exit_code == 0 else "error"
        )
        self.metrics.observe(status, time.perf_counter() - started)
        return result

    async def run_notebook(
        self,
        owner: str,
        cells: list[str],
        *,
        total_timeout: float,
        cell_timeout: float | None,
        files: dict[str, bytes],
        fetch: Sequence[str],
    ) -> NotebookRun:
        """`cells` in order in one fresh kernel, then discarded."""
        for cell in cells:
            self.check_code(cell)
        return await self.engine.run_notebook(
            owner,
            cells,
            total_timeout=total_timeout,
            cell_timeout=cell_timeout,
            files=files,
            fetch=fetch,
        )

    # -- the tool ---------------------------------------------------------------------------

    async def tool_call(
        self, owner: str, request: ToolCallRequest, *, base_url: str
    ) -> ToolCallResponse:
        """Run a model's `code_interpreter` call; without `session_id` a new session is made
        (its id is returned, so the next call sees the same variables). Malformed arguments
        come back as a tool message the model can act on, not as an error."""
        # The arguments are checked first: a call refused as too large must leave no session.
        try:
            code, invalid = extract_code(request.arguments), None
            self.check_code(code)
        except InvalidArguments as exc:
            code, invalid = "", exc
        if request.session_id is None:
            # Short-lived unless used again: a model that never comes back must not hold a slot.
            idle = self.settings.tool_session_idle_timeout
            session_id = (await self.engine.create(owner, idle_timeout=idle)).id
        else:
            session_id = (await self.engine.get(request.session_id, owner)).id
        started = time.perf_counter()
        if invalid is not None:
            execution = Execution(
                status="error",
                error=ErrorInfo(name="InvalidArguments", value=str(invalid)),
                outputs=[OutputRef(type="error")],
            )
        else:
            execution = await self.engine.execute(session_id, owner, code, request.timeout)
        execution = self._finish(execution, started, base_url=base_url, session_id=session_id)
        options = render_options(request.format, default_envelope="openai")
        message = render_message(execution, options, tool_call_id=request.tool_call_id)
        return ToolCallResponse(session_id=session_id, message=message, execution=execution)

    # -- the service itself -----------------------------------------------------------------

    async def readiness(self) -> tuple[str | None, dict[str, Any]]:
        """(why no session can be served now or soon, or None when one can; what /readyz
        shows). A backend that fails to start kernels cannot serve."""
        status = await self.engine.status()
        report: dict[str, Any] = {
            "status": "ready",
            "idle_kernels": status.idle_kernels,
            "isolation": status.isolation,
        }
        if status.hosts:
            report["hosts"] = status.hosts
        return status.not_ready, report

    async def scrape(self) -> bytes:
        """The Prometheus exposition of the service's metrics, as of now."""
        return self.metrics.scrape(await self.engine.status())

    # -- shared -----------------------------------------------------------------------------

    def check_code(self, code: str) -> None:
        limit = self.settings.max_code_chars
        if len(code) > limit:
            raise CodeTooLarge(f"code is {len(code)} characters; the limit is {limit}")

    def _finish(
        self,
        execution: Execution,
        started: float,
        *,
        fmt: Format | None = None,
        base_url: str | None = None,
        session_id: str | None = None,
    ) -> Execution:
        """Give images their URLs (the session's file route under `base_url`, else the image
        itself as a data URL), render `text` if asked, and count the execution."""
        for image in execution.images:
            if session_id is not None and base_url is not None:
                image.url = f"{base_url}/v1/sessions/{session_id}/files/{image.path}"
            else:
                encoded = image_base64(execution, image.path, image.mime)
                image.url = image.path if encoded is None else f"data:{image.mime};base64,{encoded}"
        if fmt is not None:
            execution.text = render_text(execution, render_options(fmt))
        self.metrics.observe(execution.status, time.perf_counter() - started)
        return execution
