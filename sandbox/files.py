"""Files in a session's working directory, reached without ever leaving it.

The kernel owns the working directory and may plant symlinks there (`os.symlink('/etc',
'outputs')`). Every host-side access therefore walks the path one component at a time with
`O_NOFOLLOW`, relative to a directory descriptor, so neither `..`, an absolute path nor a
symlink (even one swapped in mid-walk) can take the host outside the directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(ValueError):
    """The path is absolute, climbs out with `..`, or is otherwise not a plain relative path."""


def split_relative(path: str) -> list[str]:
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


def _refusal(exc: OSError, part: str) -> Exception:
    """ELOOP/ENOTDIR: a symlink or a file where the walk needs a directory: refused."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return UnsafePath(f"{part!r} is a symlink or not a directory")
    if exc.errno == errno.ENOENT:
        return FileNotFoundError(part)
    return exc


Owner = tuple[int, int] | None


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


def write_file(
    root: Path, path: str, data: bytes, *, exclusive: bool = False, owner: Owner = None
) -> None:
    """Write `data` at `path` under `root`; new directories and the file get `owner`."""
    parts = split_relative(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    if exclusive:
        flags |= os.O_EXCL
    with _dir_fd(root, parts[:-1], create=True, owner=owner) as dfd:
        try:
            fd = os.open(parts[-1], flags, 0o644, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise
            raise _refusal(exc, parts[-1]) from exc
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def read_file(root: Path, path: str, max_bytes: int | None = None) -> bytes:
    parts = split_relative(path)
    with _dir_fd(root, parts[:-1], create=False) as dfd:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            raise _refusal(exc, parts[-1]) from exc
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(f"{path!r} is not a regular file")
            size = st.st_size
            if max_bytes is not None and size > max_bytes:
                raise FileTooLarge(f"{path!r} is {size} bytes, over the {max_bytes}-byte limit")
            return f.read()


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


class FileTooLarge(ValueError):
    pass


@dataclass
class FileInfo:
    path: str
    size: int
    modified: float


def list_files(root: Path, max_entries: int = 10_000) -> list[FileInfo]:
    """Regular files below `root`, relative paths; symlinks are neither followed nor listed."""
    out: list[FileInfo] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                rel = os.path.relpath(full, root)
                out.append(FileInfo(rel, st.st_size, st.st_mtime))
                if len(out) >= max_entries:
                    return out
    return out
