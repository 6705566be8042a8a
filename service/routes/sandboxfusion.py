"""SandboxFusion-compatible `/run_code` (python and pytest) and `/run_jupyter`.

Clients that speak SandboxFusion (its PyPI client, verl, SimpleTIR, ToRL) switch by changing
one URL. Bodies and answers are SandboxFusion's own models (kernelbox_wire/sandboxfusion.py); an
answer is HTTP 200 whatever the code did, as there. Where kernelbox differs on purpose (the
README's SandboxFusion section lists the same):

- `run_code` runs on a fork server (sandbox/forkserver.py): a fresh child of a template that
  has the data stack imported, not a fresh interpreter; the semantics of `python file.py` (and
  of `pytest file.py *args` for `language: "pytest"`) are kept (return code, traceback on
  stderr, stdin, files in the working directory).
- `run_jupyter` applies `cell_timeout` (SandboxFusion parses it and never applies it) and, on
  a time limit, returns the cells that ran (SandboxFusion returns none).
- paths in `files` and `fetch_files` are relative to the working directory, or absolute under
  /tmp, /mnt or /data: scratch of the run's own sandbox, never the host's; other absolute
  paths and `..` answer `SandboxError` with a message that says so.
- other languages answer `Failed` (not `SandboxError`, which SandboxFusion's client retries for
  seconds) with a message and a run_result of status `Error` that say why.
- `memory_limit_MB` > 0 lowers the run's address-space limit (never raises the service's).
"""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter

from kernelbox_server.sandbox import files as sandbox_files
from kernelbox_server.sandbox.errors import KernelStartError, PoolExhausted
from kernelbox_server.sandbox.forkserver import ForkServerError, RunRequest
from kernelbox_wire.models import Execution
from kernelbox_wire.sandboxfusion import (
    CellRunResult,
    CommandRunResult,
    CommandRunStatus,
    RunCodeRequest,
    RunCodeResponse,
    RunJupyterRequest,
    RunJupyterResponse,
    RunStatus,
)

from ..deps import App, Owner
from ..settings import Settings

router = APIRouter(tags=["sandboxfusion"])

_RESPONSES = {401: {"description": "Missing or invalid API key"}}


class _Refused(Exception):
    """The request cannot run here; answered as SandboxFusion answers a sandbox error."""


#: the languages /run_code runs
LANGUAGES = ("python", "pytest")
_WHERE = "paths are relative to the working directory, or absolute under " + ", ".join(
    sandbox_files.SCRATCH_ROOTS
)


def _checked_path(path: str, what: str) -> str:
    try:
        if path.startswith("/"):
            sandbox_files.split_scratch(path)
        else:
            sandbox_files.split_relative(path)
    except sandbox_files.UnsafePath as exc:
        raise _Refused(f"{what}: {exc}; {_WHERE}") from None
    return path


def _checked_files(given: dict[str, str | None]) -> dict[str, str]:
    out = {}
    for path, content in given.items():
        # Skipped as SandboxFusion skips them: null content, and its IGNORE_THIS_FILE marker.
        if content is None or "IGNORE_THIS_FILE" in path:
            continue
        _checked_path(path, "files")
        try:  # line breaks allowed (base64.encodebytes makes them), nothing else foreign
            base64.b64decode("".join(content.split()), validate=True)
        except (binascii.Error, ValueError):
            raise _Refused(f"files: the content of {path!r} is not valid base64") from None
        out[path] = content
    return out


def _timeout(settings: Settings, value: float) -> float:
    return min(max(float(value), 0.001), settings.max_timeout)


def _sandbox_error(message: str) -> RunCodeResponse:
    # Always a run_result with string streams: clients index run_result["stdout"] blindly.
    return RunCodeResponse(
        status=RunStatus.SandboxError,
        message=message,
        run_result=CommandRunResult(status=CommandRunStatus.Error, stdout="", stderr=message),
    )


def _unsupported(language: str) -> RunCodeResponse:
    """A final answer: SandboxFusion's client retries every SandboxError (and every non-200)
    with backoff, 17.8 s in all by default, and returns a `Failed` at once. No compile_result
    and no return code: nothing ran."""
    message = (
        f"kernelbox runs python and pytest only: language {language!r} is not supported here "
        "(use a SandboxFusion server for it)"
    )
    return RunCodeResponse(
        status=RunStatus.Failed,
        message=message,
        run_result=CommandRunResult(
            status=CommandRunStatus.Error, execution_time=0.0, stdout="", stderr=message
        ),
    )


@router.post("/run_code", response_model=RunCodeResponse, responses=_RESPONSES)
async def run_code(body: RunCodeRequest, application: App, owner: Owner) -> RunCodeResponse:
    """Run `code` as a fresh python program (or its tests under pytest): stdout, stderr,
    return code, files."""
    if body.language not in LANGUAGES:
        return _unsupported(body.language)
    application.check_code(body.code)
    try:
        files = _checked_files(body.files)
        fetch = [_checked_path(p, "fetch_files") for p in body.fetch_files]
    except _Refused as exc:
        return _sandbox_error(str(exc))
    limit = body.memory_limit_MB * 1024**2 if body.memory_limit_MB > 0 else None
    run = RunRequest(
        code=body.code,
        timeout=_timeout(application.settings, body.run_timeout),
        stdin=body.stdin,
        files=files,
        fetch_files=fetch,
        memory_bytes=limit,
        language=body.language,  # type: ignore[arg-type]  # one of LANGUAGES
        args=list(body.args) if body.language == "pytest" else [],
    )
    try:
        result = await application.run_program(owner, run)
    except (ForkServerError, PoolExhausted) as exc:
        return _sandbox_error(str(exc))
    timed_out = result.status == "timeout"
    return RunCodeResponse(
        status=RunStatus.Success if result.exit_code == 0 and not timed_out else RunStatus.Failed,
        message="",
        run_result=CommandRunResult(
            status=CommandRunStatus.TimeLimitExceeded if timed_out else CommandRunStatus.Finished,
            execution_time=result.duration,
            return_code=None if timed_out else result.exit_code,
            stdout=result.stdout,
            stderr=result.stderr,
        ),
        files={name: base64.b64encode(data).decode() for name, data in result.files.items()},
    )


@router.post("/run_jupyter", response_model=RunJupyterResponse, responses=_RESPONSES)
async def run_jupyter(
    body: RunJupyterRequest, application: App, owner: Owner
) -> RunJupyterResponse:
    """Run `cells` in order in one fresh kernel (taken warm from the pool, then discarded)."""
    for cell in body.cells:
        application.check_code(cell)
    try:
        files = _checked_files(dict(body.files))
        fetch = [_checked_path(p, "fetch_files") for p in body.fetch_files]
    except _Refused as exc:
        return RunJupyterResponse(status=RunStatus.SandboxError, message=str(exc))
    settings = application.settings
    total = body.total_timeout if body.total_timeout > 0 else settings.max_timeout
    try:
        run = await application.run_notebook(
            owner,
            body.cells,
            total_timeout=_timeout(settings, total),
            cell_timeout=_timeout(settings, body.cell_timeout) if body.cell_timeout > 0 else None,
            files={path: base64.b64decode(content) for path, content in files.items()},
            fetch=fetch,
        )
    except (KernelStartError, PoolExhausted) as exc:
        # SandboxFusion's clients read every answer as 200 with a status, never an HTTP error.
        return RunJupyterResponse(status=RunStatus.SandboxError, message=str(exc))
    except (OSError, sandbox_files.UnsafePath, sandbox_files.FileTooLarge) as exc:
        return RunJupyterResponse(
            status=RunStatus.SandboxError, message=f"files: could not write: {exc}"
        )
    if run.timed_out:
        driver = CommandRunResult(
            status=CommandRunStatus.TimeLimitExceeded,
            execution_time=run.elapsed,
            stdout="",
            stderr="",
        )
    else:
        driver = CommandRunResult(
            status=CommandRunStatus.Finished,
            execution_time=run.elapsed,
            return_code=1 if run.died else 0,
            stdout="",
            stderr="",
        )
    return RunJupyterResponse(
        status=RunStatus.Failed if run.timed_out or run.died else RunStatus.Success,
        message="; ".join(run.notes),
        driver=driver,
        cells=[_cell(execution) for execution in run.executions],
        files={path: base64.b64encode(data).decode() for path, data in run.files.items()},
    )


def _cell(execution: Execution) -> CellRunResult:
    """Our Execution in SandboxFusion's cell shape: streams, mime bundles, IOPub-style errors."""
    error = []
    if execution.error is not None:
        error.append(
            {
                "ename": execution.error.name,
                "evalue": execution.error.value,
                "traceback": execution.error.traceback,
            }
        )
    return CellRunResult(
        stdout=execution.stdout,
        stderr=execution.stderr,
        display=[result.data for result in execution.results],
        error=error,
    )
