"""SandboxFusion's notebooks (`/run_jupyter`): cells run in order in one fresh kernel, used
once and discarded, with files written in first and fetched back at the end."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from kernelbox_wire.models import Execution

from .session import KernelSession


@dataclass
class NotebookRun:
    """What `run_notebook` did: the cells that ran, in order."""

    executions: list[Execution] = field(default_factory=list)
    timed_out: bool = False  # the total or a cell's deadline passed
    died: bool = False  # the kernel died in the last cell
    files: dict[str, bytes] = field(default_factory=dict)  # the fetched ones
    notes: list[str] = field(default_factory=list)  # fetched files left out, and why
    elapsed: float = 0.0  # seconds, kernel acquisition included


class Throwaway(Protocol):
    def __call__(self, owner: str) -> AbstractAsyncContextManager[KernelSession]: ...


async def run_notebook(
    throwaway: Throwaway,
    owner: str,
    cells: list[str],
    *,
    total_timeout: float,
    cell_timeout: float | None = None,
    files: dict[str, bytes] | None = None,
    fetch: Sequence[str] = (),
) -> NotebookRun:
    """See `SessionManager.run_notebook`."""
    run = NotebookRun()
    started = time.monotonic()
    async with throwaway(owner) as session:
        deadline = time.monotonic() + total_timeout
        for path, data in (files or {}).items():
            await session.workspace.write(path, data)
        for cell in cells:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                run.timed_out = True
                break
            timeout = min(remaining, cell_timeout) if cell_timeout else remaining
            execution = await session.execute(cell, timeout)
            run.executions.append(execution)
            if execution.status in ("timeout", "died"):
                # The kernel was interrupted or lost its state: later cells would run
                # against something else than the notebook meant.
                run.timed_out = execution.status == "timeout"
                run.died = execution.status == "died"
                break
        if fetch:
            run.files, run.notes = await session.workspace.read_many(list(fetch))
    run.elapsed = time.monotonic() - started
    return run
