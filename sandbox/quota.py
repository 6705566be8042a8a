"""The working directory's disk quota, watched while code runs.

A container's writable bind mount has no size limit of its own on most engines (and the local
backend has none), so the engine measures the directory while code runs and interrupts the
code that pushes it past the limit. Per-file size is bounded separately (RLIMIT_FSIZE /
the fsize ulimit), so one check interval can overshoot by at most what the code writes in it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

CHECK_INTERVAL = 0.5


def directory_size(root: Path) -> int:
    """Bytes allocated under `root`; symlinks are not followed, hard links counted once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


@dataclass
class DiskUsage:
    """The last size measured for a working directory (0 for a new, empty one)."""

    bytes: int = 0


async def watch(
    root: Path, limit: int, usage: DiskUsage, on_exceeded: Callable[[int], Awaitable[None]]
) -> None:
    """While code runs (cancel to stop): call `on_exceeded(size)` once if `root` is past
    `limit` and has grown since it was last measured, so that code cleaning up an over-full
    directory is not stopped for it. Nothing is measured for runs shorter than one interval."""
    while True:
        await asyncio.sleep(CHECK_INTERVAL)
        size = await asyncio.to_thread(directory_size, root)
        grew = size > usage.bytes
        usage.bytes = size
        if size > limit and grew:
            await on_exceeded(size)
            return
