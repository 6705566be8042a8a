"""SandboxFusion's notebooks (`/run_jupyter`): cells run in order in one fresh kernel, used
once and discarded, with files written in first and fetched back at the end.

Relative paths are the session's working directory, reached through its Workspace (the
bounded file layer). Absolute ones (under files.SCRATCH_ROOTS: /tmp, /mnt, /data) are the
kernel's own scratch, which the host cannot reach on every backend (a Docker tmpfs, a bwrap
tmpfs, a gVisor sandbox): they are written and read *by the kernel*, in its own view, with
code the engine sends before and after the cells. That code never follows a link (each
component opened O_NOFOLLOW), opens non-blocking and refuses anything but a regular file, and
reads in chunks that fit the output cap; sizes are checked against the same limits as the
Workspace's. On a backend whose kernels are not sandboxed, absolute paths are refused: there
they would be the host's."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from kernelbox_wire.models import Execution

from .files import FileTooLarge, UnsafePath, split_scratch
from .session import KernelSession

#: defined in the (throwaway) kernel for the engine's scratch reads and writes
_HELPER = r"""
def __kernelbox_scratch(path, mode, data=None, offset=0, size=0):
    import base64, json, os, stat
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if mode != "w":
                    raise
                os.mkdir(part, 0o700, dir_fd=fd)
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC if mode == "w" else os.O_RDONLY
        f = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600,
                    dir_fd=fd)
    finally:
        os.close(fd)
    try:
        st = os.fstat(f)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError("not a regular file")
        if mode == "w":
            view = memoryview(base64.b64decode(data))
            while view:
                view = view[os.write(f, view):]
            return None
        if mode == "stat":
            return st.st_size
        return base64.b64encode(os.pread(f, size, offset)).decode()
    finally:
        os.close(f)

def __kernelbox_call(*args):
    import json
    try:
        print(json.dumps({"ok": __kernelbox_scratch(*args)}))
    except FileNotFoundError:
        print(json.dumps({"missing": True}))
    except OSError as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc.strerror or exc}"}))
"""


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
    files = files or {}
    if any(path.startswith("/") for path in [*files, *fetch]):
        for path in [*files, *fetch]:
            if path.startswith("/"):
                split_scratch(path)  # UnsafePath for anything else
    async with throwaway(owner) as session:
        deadline = time.monotonic() + total_timeout
        limits = session.workspace.limits
        scratch = _Scratch(session)
        for path, data in files.items():
            if not path.startswith("/"):
                await session.workspace.write(path, data)
            elif len(data) > limits.max_file_bytes:
                raise FileTooLarge(
                    f"{len(data)} bytes is over the {limits.max_file_bytes}-byte file limit"
                )
            else:
                await scratch.write(path, data)
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
            relative = [p for p in fetch if not p.startswith("/")]
            found, notes = await session.workspace.read_many(relative)
            total = sum(len(data) for data in found.values())
            for path in (p for p in fetch if p.startswith("/")):
                data, note = await scratch.read(
                    path, limits.max_file_bytes, limits.max_response_bytes - total
                )
                if data is not None:
                    found[path] = data
                    total += len(data)
                if note:
                    notes.append(note)
            run.files = {p: found[p] for p in fetch if p in found}
            run.notes = notes
    run.elapsed = time.monotonic() - started
    return run


class _Scratch:
    """The kernel's own scratch files, through the kernel (see the module docstring)."""

    #: per call, at most: the engine's code must not wait on a kernel forever
    TIMEOUT = 30.0

    def __init__(self, session: KernelSession) -> None:
        self.session = session
        self.ready = False
        cap = min(session.backend.config.output_cap_chars, session.options.capture.max_chars)
        self.chunk = max(3, (cap // 2) // 4 * 3)  # raw bytes whose base64 fits the cap

    async def _call(self, *args: object) -> dict:
        if not self.session.backend.scratch_is_private:
            raise UnsafePath("absolute paths need a sandboxed kernel (the local backend has none)")
        prefix = "" if self.ready else _HELPER
        self.ready = True
        code = f"{prefix}\n__kernelbox_call(*{list(args)!r})"
        execution = await self.session.execute(code, self.TIMEOUT)
        try:
            return json.loads(execution.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            detail = execution.error.value if execution.error else execution.status
            raise OSError(f"the kernel did not answer ({detail})") from None

    async def write(self, path: str, data: bytes) -> None:
        answer = await self._call(path, "w", base64.b64encode(data).decode())
        if "ok" not in answer:
            raise OSError(f"{path!r}: {answer.get('error', 'its directory is missing')}")

    async def read(self, path: str, max_file: int, budget: int) -> tuple[bytes | None, str]:
        """(content or None, a note when it was left out for a reason other than absence)."""
        answer = await self._call(path, "stat")
        if answer.get("missing"):
            return None, ""
        if "ok" not in answer:
            return None, f"{path!r} was left out: {answer['error']}"
        size = int(answer["ok"])
        if size > max_file:
            return None, f"{path!r} ({size} bytes) is over the {max_file}-byte file limit"
        if size > budget:
            return None, (
                f"{path!r} ({size} bytes) was left out: the files of one response are "
                "limited together"
            )
        chunks: list[bytes] = []
        offset = 0
        while offset < size:
            answer = await self._call(path, "r", None, offset, min(self.chunk, size - offset))
            if "ok" not in answer:
                return None, f"{path!r} was left out: {answer.get('error', 'it went away')}"
            chunk = base64.b64decode(answer["ok"])
            if not chunk:
                break  # it shrank meanwhile
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks), ""
