"""A session's working directory, as everything above the backend reaches it.

The engine and the service never touch a working directory by its host path: they ask the
session's `Workspace`, which goes through the bounded file layer (files.py: bounded, off the
event loop, never following a link, with a per-session share of the file threads), writes
what it writes as the kernel's user (`adopt`), and removes the directory when the session is
done. Only the backend is handed `root`, to give it to the kernel.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .files import SessionFiles

if TYPE_CHECKING:
    from .backends.base import KernelProcess


class Remover(Protocol):
    """What made a working directory and removes it (workdirs.Workdirs)."""

    async def remove(self, workdir: Path) -> None: ...


#: bytes read per step when a file is streamed out
CHUNK_BYTES = 1024**2


@dataclass
class Workspace(SessionFiles):
    #: where the directory came from, which removes it (None: its creator does)
    workdirs: Remover | None = None

    def adopt(self, proc: KernelProcess) -> None:
        """Files written from now on belong to `proc`'s user, so its code can change them."""
        self.owner = proc.file_owner

    @property
    def ref(self) -> str:
        """What names this directory in a description of the session's kernel."""
        return str(self.root)

    async def stream(self, path: str) -> tuple[int, AsyncIterator[bytes]]:
        """(size, chunks) of a regular file, each chunk read off the event loop; at most the
        size it had when opened. The first chunk is read now, so that the file is closed by
        the iterator's end even if its body is never sent."""
        fd, size = await self.open(path)
        chunks = self._chunks(fd, size)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = b""

        async def body() -> AsyncIterator[bytes]:
            yield first
            async for chunk in chunks:
                yield chunk

        return size, body()

    async def _chunks(self, fd: int, size: int) -> AsyncIterator[bytes]:
        try:
            left = size
            while left > 0:
                chunk = await self.read_chunk(fd, min(left, CHUNK_BYTES))
                if not chunk:
                    break  # it shrank meanwhile: the reader sees a short body
                left -= len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def remove(self) -> None:
        """Remove the directory and everything in it (however deep or large)."""
        if self.workdirs is not None:
            await self.workdirs.remove(self.root)
