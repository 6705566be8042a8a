"""The working directory's disk limit where no filesystem enforces it, by measuring.

Where each working directory is a size-limited filesystem of its own (workdirs.py, a root
service), the filesystem enforces the limit and nothing here runs. Elsewhere (a non-root
service; a service in a container without the right to mount) the size is measured, through
the bounded file layer: every half second while code runs, interrupting the code that pushes
it past the limit, and between executions by the manager (`KernelSession.check_disk`), which
replaces a kernel whose background writers keep going. Per-file size is bounded separately
(RLIMIT_FSIZE / the fsize ulimit), so one interval can overshoot by at most what the code
writes in it. A tree too large or too deep to measure counts as over the limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .files import FileOpTimeout
from .workspace import Workspace

CHECK_INTERVAL = 0.5


@dataclass
class DiskUsage:
    """The last size measured for a working directory (0 for a new, empty one)."""

    bytes: int = 0

    async def over(self, workspace: Workspace, limit: int) -> int | None:
        """Measure; the size when it is past `limit` and has grown since last measured (so
        that code cleaning up an over-full directory is not stopped for it), else None."""
        try:
            size, complete = await workspace.usage()
        except FileOpTimeout:
            return None  # measured next time; the file layer's own share is what is stuck
        if not complete:
            size = max(size, limit + 1)
        grew = size > self.bytes
        self.bytes = size
        return size if size > limit and grew else None


async def watch(
    workspace: Workspace,
    limit: int,
    usage: DiskUsage,
    on_exceeded: Callable[[int], Awaitable[None]],
) -> None:
    """While code runs (cancel to stop): call `on_exceeded(size)` once when the directory
    passes `limit`. Nothing is measured for runs shorter than one interval."""
    while True:
        await asyncio.sleep(CHECK_INTERVAL)
        size = await usage.over(workspace, limit)
        if size is not None:
            await on_exceeded(size)
            return
