"""Every host-side operation on a session's files: bounded, non-blocking, off the event loop.

The kernel owns its working directory and may plant anything there: symlinks to host files,
FIFOs whose open blocks until someone writes, sockets, trees thousands of levels deep or with
millions of entries, files of any size, swapped while the host looks. So every operation here

- walks a path one component at a time relative to a directory descriptor, with `O_NOFOLLOW`,
  so neither `..`, an absolute path nor a symlink (even one swapped in mid-walk) leaves the
  directory;
- opens with `O_NONBLOCK` and checks on the descriptor that it has a regular file before it
  reads a byte (a FIFO's open returns at once, and is refused);
- caps bytes per file and per response, and entries and depth per walk, iteratively (no
  recursion: a 1,500-level tree is only a longer loop);
- runs in `FileIO`: threads of its own (never the event loop's default pool), at most a few at a
  time per session, and a deadline per operation, so a stuck call fails its own request and
  nobody else's.

The synchronous functions are the mechanism; `SessionFiles` is what the engine and the service
call.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

T = TypeVar("T")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Directories held open at once while a tree is removed; deeper subtrees are moved up first.
_MAX_OPEN_DIRS = 64

Owner = tuple[int, int] | None


class UnsafePath(ValueError):
    """An absolute path, one that climbs out with `..`, or one through a symlink or a file."""


class FileTooLarge(ValueError):
    """A file (or the files of one response together) is over its byte limit."""


class NotARegularFile(FileNotFoundError):
    """The path names a FIFO, socket, device or directory: nothing the host reads or replaces."""


class FileOpTimeout(TimeoutError):
    """A file operation did not finish within its deadline (or the session's share is stuck)."""


@dataclass(frozen=True)
class FileLimits:
    max_file_bytes: int = 100 * 1024**2  # one file read or written
    max_response_bytes: int = 64 * 1024**2  # the files of one response together (fetch_files)
    max_entries: int = 10_000  # entries listed
    max_depth: int = 64  # directory levels listed
    timeout: float = 10.0  # seconds per operation


@dataclass
class FileInfo:
    path: str
    size: int
    modified: float


@dataclass
class Listing:
    files: list[FileInfo] = field(default_factory=list)
    #: entries or levels were left out (more than the limits allow)
    truncated: bool = False


# -- paths -----------------------------------------------------------------------------------


def split_relative(path: str) -> list[str]:
    """The components of a plain relative path, or UnsafePath."""
    if not path or "\x00" in path:
        raise UnsafePath("the path is empty or contains a NUL byte")
    pure = PurePosixPath(path)
    if pure.is_absolute() or path.startswith("~"):
        raise UnsafePath(f"absolute paths are not allowed: {path!r}")
    parts = [p for p in pure.parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePath(f"'..' is not allowed in paths: {path!r}")
    if not parts:
        raise UnsafePath("the path names the working directory itself")
    return parts


#: absolute paths a sandbox's code may use for scratch files (SandboxFusion's `/mnt/b`): each
#: sandbox's own (a run's own, on the fork server), never the host's
SCRATCH_ROOTS = ("/tmp", "/mnt", "/data")


def split_scratch(path: str) -> list[str]:
    """The components of an absolute path under a SCRATCH_ROOTS entry (the root first), or
    UnsafePath; `..` is refused, not resolved."""
    if not path or "\x00" in path:
        raise UnsafePath("the path is empty or contains a NUL byte")
    parts = [p for p in PurePosixPath(path).parts[1:] if p not in ("", ".")]
    if not path.startswith("/") or any(p == ".." for p in parts):
        raise UnsafePath(f"not a plain absolute path: {path!r}")
    if len(parts) < 2 or f"/{parts[0]}" not in SCRATCH_ROOTS:
        raise UnsafePath(
            f"absolute paths must name a file under {', '.join(SCRATCH_ROOTS)}: {path!r}"
        )
    return parts


def _refusal(exc: OSError, part: str) -> Exception:
    """ELOOP/ENOTDIR: a symlink or a file where the walk needs a directory: refused."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return UnsafePath(f"{part!r} is a symlink or not a directory")
    if exc.errno == errno.ENOENT:
        return FileNotFoundError(part)
    return exc


@contextlib.contextmanager
def _dir_fd(root: Path, parts: list[str], create: bool, owner: Owner = None) -> Iterator[int]:
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    if owner is not None:
                        os.chown(part, *owner, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise _refusal(exc, part) from exc
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


# -- single files (synchronous: run them through FileIO) --------------------------------------


def open_regular(root: Path, path: str, max_bytes: int | None = None) -> tuple[int, int]:
    """Open `path` under `root` for reading: (fd, size). Never blocks (a FIFO's open returns at
    once); refuses anything but a regular file, and files over `max_bytes`."""
    parts = split_relative(path)
    with _dir_fd(root, parts[:-1], create=False) as dfd:
        try:
            fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a socket
                raise NotARegularFile(f"{path!r} is not a regular file") from None
            raise _refusal(exc, parts[-1]) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(f"{path!r} is not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileTooLarge(f"{path!r} is {st.st_size} bytes, over the {max_bytes}-byte limit")
        os.set_blocking(fd, True)  # a regular file: reads never wait on anyone
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_at_most(fd: int, size: int) -> bytes:
    """Up to `size` bytes from `fd`'s current offset (a file that grew is cut at `size`)."""
    chunks, left = [], size
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_file(root: Path, path: str, max_bytes: int | None = None) -> bytes:
    fd, size = open_regular(root, path, max_bytes)
    try:
        return read_at_most(fd, size)
    finally:
        os.close(fd)


def write_file(
    root: Path, path: str, data: bytes, *, exclusive: bool = False, owner: Owner = None
) -> None:
    """Write `data` at `path` under `root`; new directories and the file get `owner`. An
    existing FIFO, socket or device at `path` is refused, never opened for writing."""
    parts = split_relative(path)
    with _dir_fd(root, parts[:-1], create=True, owner=owner) as dfd:
        name = parts[-1]
        flags = _WRITE_FLAGS | (os.O_EXCL if exclusive else 0)
        try:
            fd = os.open(name, flags, 0o644, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise
            if exc.errno in (errno.ENXIO, errno.EISDIR):
                raise NotARegularFile(f"{path!r} is not a regular file") from None
            raise _refusal(exc, name) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotARegularFile(f"{path!r} is not a regular file")
            os.set_blocking(fd, True)
            os.ftruncate(fd, 0)
            if owner is not None:
                os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def delete_file(root: Path, path: str) -> None:
    parts = split_relative(path)
    with _dir_fd(root, parts[:-1], create=False) as dfd:
        try:
            st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            raise FileNotFoundError(path) from exc
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(path)
        os.unlink(parts[-1], dir_fd=dfd)


def read_many(
    root: Path, paths: list[str], max_file_bytes: int, max_total_bytes: int
) -> tuple[dict[str, bytes], list[str]]:
    """Read several files, within a total: (contents, notes about what was left out). Missing
    files are left out silently (SandboxFusion's `fetch_files`); refused ones with a note."""
    found: dict[str, bytes] = {}
    notes: list[str] = []
    total = 0
    for path in paths:
        try:
            fd, size = open_regular(root, path, max_file_bytes)
        except FileNotFoundError as exc:
            if isinstance(exc, NotARegularFile):
                notes.append(str(exc))
            continue
        except (UnsafePath, FileTooLarge) as exc:
            notes.append(str(exc))
            continue
        try:
            if total + size > max_total_bytes:
                notes.append(
                    f"{path!r} ({size} bytes) was left out: the files of one response are "
                    f"limited to {max_total_bytes} bytes together"
                )
                continue
            found[path] = data = read_at_most(fd, size)
            total += len(data)
        finally:
            os.close(fd)
    return found, notes


# -- trees -----------------------------------------------------------------------------------


@dataclass
class _Frame:
    fd: int
    rel: str  # path from the top, "" for the top itself
    name: str  # name in the parent directory
    pending: list[str] | None = None  # subdirectories still to visit


@dataclass
class Entry:
    """One entry met by a `Walk`: act on it through `dir_fd` and `name` (a single component,
    so no link on the way can redirect the call), and name it to people by `path`."""

    dir_fd: int
    name: str
    path: str
    stat: os.stat_result


class Walk:
    """Every entry below a directory, each directory before what it holds; symlinks are neither
    followed nor entered. Iterative, at most `max_depth` levels and `max_entries` entries;
    `truncated` says afterwards whether either bound cut it short."""

    def __init__(self, root: Path | int, max_entries: int, max_depth: int) -> None:
        self.root, self.max_entries, self.max_depth = root, max_entries, max_depth
        self.truncated = False

    def __iter__(self) -> Iterator[Entry]:
        top = os.dup(self.root) if isinstance(self.root, int) else os.open(self.root, _DIR_FLAGS)
        stack = [_Frame(top, "", "")]
        seen = 0
        try:
            while stack:
                frame = stack[-1]
                if frame.pending is None:
                    frame.pending = []
                    with os.scandir(frame.fd) as entries:
                        for item in entries:
                            seen += 1
                            if seen > self.max_entries:
                                self.truncated = True
                                return
                            try:
                                st = item.stat(follow_symlinks=False)
                            except OSError:
                                continue
                            rel = f"{frame.rel}/{item.name}" if frame.rel else item.name
                            yield Entry(frame.fd, item.name, rel, st)
                            if stat.S_ISDIR(st.st_mode):
                                if len(stack) <= self.max_depth:
                                    frame.pending.append(item.name)
                                else:
                                    self.truncated = True
                if not frame.pending:
                    os.close(stack.pop().fd)
                    continue
                name = frame.pending.pop()
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=frame.fd)
                except OSError:
                    continue  # replaced by a symlink or removed meanwhile: not ours to enter
                stack.append(_Frame(fd, f"{frame.rel}/{name}" if frame.rel else name, name))
        finally:
            for frame in stack:
                os.close(frame.fd)


def list_files(root: Path, max_entries: int = 10_000, max_depth: int = 64) -> Listing:
    """Regular files below `root`, by relative path; symlinks neither followed nor listed."""
    walk = Walk(root, max_entries, max_depth)
    found = [
        FileInfo(e.path, e.stat.st_size, e.stat.st_mtime)
        for e in walk
        if stat.S_ISREG(e.stat.st_mode)
    ]
    found.sort(key=lambda f: f.path)
    return Listing(found, truncated=walk.truncated)


def tree_usage(root: Path, max_entries: int, max_depth: int) -> tuple[int, bool]:
    """(bytes allocated below `root`, whether every entry was counted). Hard links once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    walk = Walk(root, max_entries, max_depth)
    for entry in walk:
        st = entry.stat
        if not stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total, not walk.truncated


def give_tree(root: Path, owner: tuple[int, int], max_entries: int = 1_000_000) -> bool:
    """Make `root` and what is below it belong to `owner`, never through a link. Returns False
    when the tree had more than `max_entries` entries (the rest left as they were)."""
    uid, gid = owner
    fd = os.open(root, _DIR_FLAGS)
    try:
        os.fchown(fd, uid, gid)
        walk = Walk(fd, max_entries, max_depth=256)
        for entry in walk:
            if (entry.stat.st_uid, entry.stat.st_gid) != owner:
                with _missing_ok():
                    os.chown(entry.name, uid, gid, dir_fd=entry.dir_fd, follow_symlinks=False)
    finally:
        os.close(fd)
    return not walk.truncated


def remove_tree(path: Path) -> None:
    """Remove `path` and everything below it: iterative, through directory descriptors, never
    following a link, whatever the depth (subtrees deeper than the descriptors it keeps open
    are moved up to the top first). A missing `path` is not an error."""
    try:
        parent = os.open(path.parent, _DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        try:
            st = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path.name, dir_fd=parent)
            return
        top = os.open(path.name, _DIR_FLAGS, dir_fd=parent)
        try:
            _empty(top)
        finally:
            os.close(top)
        os.rmdir(path.name, dir_fd=parent)
    finally:
        os.close(parent)


def _empty(top: int) -> None:
    stack = [_Frame(top, "", "")]
    try:
        while stack:
            frame = stack[-1]
            if frame.pending is None:
                frame.pending = []
                with os.scandir(frame.fd) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            frame.pending.append(entry.name)
                        else:
                            with _missing_ok():
                                os.unlink(entry.name, dir_fd=frame.fd)
            if frame.pending:
                name = frame.pending.pop()
                if len(stack) >= _MAX_OPEN_DIRS:
                    # Too deep to keep a descriptor per level: hang this subtree off the top.
                    moved = f".kernelbox-rm-{uuid.uuid4().hex}"
                    with _missing_ok():
                        os.rename(name, moved, src_dir_fd=frame.fd, dst_dir_fd=top)
                        stack[0].pending.append(moved)  # type: ignore[union-attr]
                    continue
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=frame.fd)
                except FileNotFoundError:
                    continue
                stack.append(_Frame(fd, "", name))
                continue
            stack.pop()
            if stack:  # the top itself is removed by the caller
                os.close(frame.fd)
                with _missing_ok():
                    os.rmdir(frame.name, dir_fd=stack[-1].fd)
    finally:
        for frame in stack[1:]:
            os.close(frame.fd)


@contextlib.contextmanager
def _missing_ok() -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        pass


# -- the executor ----------------------------------------------------------------------------


class FileIO:
    """Threads for file operations on kernel-controlled paths, shared fairly.

    Each operation belongs to a key (a session). A key runs at most `per_key` operations at
    once (more wait their turn, within the deadline); an operation that passes its deadline
    fails its caller with FileOpTimeout, and its thread (which cannot be interrupted) keeps
    the key's place until it really returns. So a session whose operations get stuck loses
    its own share, never another session's.
    """

    def __init__(self, workers: int = 16, per_key: int = 2, timeout: float = 10.0) -> None:
        self.per_key = per_key
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="kernelbox-files")
        self._shares: dict[str, _Share] = {}

    async def run(
        self, key: str, fn: Callable[..., T], *args: Any, timeout: float | None = None
    ) -> T:
        timeout = timeout or self.timeout
        loop = asyncio.get_running_loop()
        share = self._shares.get(key)
        if share is None:
            share = self._shares[key] = _Share(asyncio.Semaphore(self.per_key))
        share.users += 1
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                await share.slots.acquire()
        except TimeoutError:
            self._leave(key, share)
            raise FileOpTimeout(
                f"this session's file operations did not get a turn within {timeout:g} s"
            ) from None
        except BaseException:
            self._leave(key, share)
            raise

        def done(_: object) -> None:  # on the loop, whenever the thread is done
            share.slots.release()
            self._leave(key, share)

        def done_soon(f: object) -> None:  # in the thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(done, f)

        future = self._executor.submit(fn, *args)
        future.add_done_callback(done_soon)
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            raise FileOpTimeout(f"a file operation did not finish within {timeout:g} s") from None

    def _leave(self, key: str, share: _Share) -> None:
        share.users -= 1
        if not share.users and self._shares.get(key) is share:
            del self._shares[key]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Share:
    slots: asyncio.Semaphore
    users: int = 0  # operations waiting, or in a thread (even past their deadline)


_default_io: FileIO | None = None


def default_io() -> FileIO:
    """The FileIO of sessions made outside a manager (tests, benchmarks)."""
    global _default_io
    if _default_io is None:
        _default_io = FileIO()
    return _default_io


@dataclass
class SessionFiles:
    """One working directory as the host may touch it: every call bounded and off the loop."""

    root: Path
    io: FileIO
    key: str
    limits: FileLimits = field(default_factory=FileLimits)
    #: whom files the service writes must belong to (the kernel's uid), None: the service's
    owner: Owner = None
    #: the directory is a filesystem of its own (see workdirs.py): its size is one statvfs
    own_filesystem: bool = False

    async def read(self, path: str) -> bytes:
        return await self.io.run(self.key, read_file, self.root, path, self.limits.max_file_bytes)

    async def open(self, path: str) -> tuple[int, int]:
        """(fd, size) of a regular file, for streaming it out; the caller closes the fd."""
        return await self.io.run(
            self.key, open_regular, self.root, path, self.limits.max_file_bytes
        )

    async def read_chunk(self, fd: int, size: int) -> bytes:
        return await self.io.run(self.key, read_at_most, fd, size)

    async def write(self, path: str, data: bytes, *, exclusive: bool = False) -> None:
        if len(data) > self.limits.max_file_bytes:
            raise FileTooLarge(
                f"{len(data)} bytes is over the {self.limits.max_file_bytes}-byte file limit"
            )
        await self.io.run(self.key, _write, self.root, path, data, exclusive, self.owner)

    async def delete(self, path: str) -> None:
        await self.io.run(self.key, delete_file, self.root, path)

    async def list(self) -> Listing:
        return await self.io.run(
            self.key, list_files, self.root, self.limits.max_entries, self.limits.max_depth
        )

    async def usage(self, max_entries: int = 100_000) -> tuple[int, bool]:
        """(bytes used, whether every entry was counted)."""
        if self.own_filesystem:
            st = await self.io.run(self.key, os.statvfs, self.root)
            return (st.f_blocks - st.f_bfree) * st.f_frsize, True
        return await self.io.run(self.key, tree_usage, self.root, max_entries, 256)

    async def read_many(self, paths: list[str]) -> tuple[dict[str, bytes], list[str]]:
        return await self.io.run(
            self.key,
            read_many,
            self.root,
            paths,
            self.limits.max_file_bytes,
            self.limits.max_response_bytes,
        )


def _write(root: Path, path: str, data: bytes, exclusive: bool, owner: Owner) -> None:
    write_file(root, path, data, exclusive=exclusive, owner=owner)
