"""Where sessions' working directories come from, and where they go.

They live under the data directory, at `DATA_DIR/sessions/<id>/work`, a path that does not
change from one service process to the next: a session that outlives its service (its record
in the session store, store.py) finds its files again. One service at a time owns a data
directory: it holds a lock (flock) on `DATA_DIR/.lock` for as long as it lives, and a second
service on the same directory refuses to start. At start-up the service removes the
directories that belong to no registered session (the warm kernels' of a service that was
killed, say), and what older versions left (`DATA_DIR/instance-*`, each with a lock of its
own that is free once its service is gone).

With a disk limit and the means (root, loop devices, mkfs.ext4), each working directory is a
filesystem of its own: a sparse ext4 image of the limit's size, loop-mounted `nosuid,nodev` at
`<id>/work`. The filesystem enforces the limit as code writes (ENOSPC at the byte, inodes
bounded too), also for background threads and between executions, and its size is one
`statvfs` away; removing it is an unmount. A directory whose image is not mounted any more
(the host rebooted, or the service's container was restarted) is mounted again when its
session is restored (`reopen`). A throwaway directory (a one-shot kernel's, used for one
request and removed after it) is a tmpfs of the same size and inode bounds instead: a mount
and an unmount, two system calls, where making and removing an ext4 image cost 60 to 140 ms;
its files live in memory, for as long as the request. Elsewhere it is a plain directory, whose
size the session measures while code runs and the manager between executions (quota.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import uuid
from pathlib import Path

from . import files
from .workspace import Workspace

log = logging.getLogger(__name__)

_MS_NOSUID, _MS_NODEV, _MS_NOATIME, _MNT_DETACH = 2, 4, 1024, 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

_LOCK = ".lock"
IMAGE = "disk.img"
# One inode per 16 KiB of the limit (ext4's default ratio), at least 1024: a million empty
# files cannot fit in a small quota.
_BYTES_PER_INODE = 16 * 1024


class Workdirs:
    """Working directories of the service that owns the data directory (see the module
    docstring)."""

    def __init__(self, data_dir: Path, io: files.FileIO, disk_bytes: int | None, mount: str):
        """`mount`: "auto" (a filesystem per directory where possible), "always" (refuse to
        start without), "never"."""
        self.data_dir = data_dir
        self.io = io
        self.disk_bytes = disk_bytes
        data_dir.mkdir(parents=True, exist_ok=True)
        self.root = data_dir / "sessions"
        self.root.mkdir(mode=0o755, exist_ok=True)
        self._lock_fd = os.open(data_dir / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(
                f"another kernelbox service uses the data directory {data_dir}: two cannot "
                "share one (each would take the other's sessions); give this one its own "
                "KERNELBOX_DATA_DIR"
            ) from None
        why_not = None if disk_bytes else "no disk limit is set"
        if why_not is None and mount != "never":
            why_not = _cannot_mount()
        if mount == "never":
            why_not = "KERNELBOX_WORKDIR_MOUNT=never"
        if mount == "always" and why_not:
            raise RuntimeError(f"working directories cannot be filesystems of their own: {why_not}")
        #: None when each working directory is a size-limited filesystem; else why not
        self.unenforced_reason = why_not
        if why_not and disk_bytes:
            log.warning(
                "disk limit of %d bytes per session is watched, not enforced by a filesystem "
                "(%s): code can overshoot it by what it writes between two measurements",
                disk_bytes,
                why_not,
            )

    @property
    def enforced(self) -> bool:
        return self.unenforced_reason is None

    @property
    def _inodes(self) -> int:
        """Inodes of a working directory's filesystem (ext4 image or tmpfs)."""
        assert self.disk_bytes
        return max(1024, self.disk_bytes // _BYTES_PER_INODE)

    async def remove_stale(self, keep: set[str] | frozenset[str] = frozenset()) -> list[Path]:
        """Remove the working directories of sessions not in `keep` (ids), and those of older
        versions' instances that are gone (their lock is free)."""
        removed = []
        for home in sorted(self.root.iterdir()):
            if home.name in keep or not home.is_dir() or home.is_symlink():
                continue
            log.info("removing %s, which belongs to no session", home)
            await self._unmount_below(home)
            await self.io.run(home.name, files.remove_tree, home, timeout=600)
            removed.append(home)
        for other in sorted(self.data_dir.glob("instance-*")):
            if not other.is_dir():
                continue
            try:
                fd = os.open(other / _LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                fd = -1  # made by an older version, or its lock is gone: not held either
            except OSError as exc:
                log.warning("cannot tell whether %s is in use: %s", other, exc)
                continue
            try:
                if fd >= 0:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live instance
                log.info("removing %s, left by a service that is gone", other)
                await self._unmount_below(other)
                await self.io.run(str(other), files.remove_tree, other, timeout=600)
                removed.append(other)
            finally:
                if fd >= 0:
                    os.close(fd)
        return removed

    def path_of(self, wid: str) -> Path:
        """The working directory of id `wid` (made by `create`, in this or an earlier
        process)."""
        if not wid or "/" in wid or wid.startswith("."):
            raise ValueError(f"not a working directory id: {wid!r}")
        return self.root / wid / "work"

    async def reopen(self, wid: str) -> Path | None:
        """The working directory of a restored session, its filesystem mounted again if the
        mount is gone; None if the directory is not there any more."""
        workdir = self.path_of(wid)
        if not workdir.is_dir() or workdir.is_symlink():
            return None
        image = workdir.parent / IMAGE
        if image.exists() and not os.path.ismount(workdir):
            if not self.enforced:
                raise RuntimeError(
                    f"{workdir} is a filesystem image, which cannot be mounted here: "
                    f"{self.unenforced_reason}"
                )
            await _run(
                "mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noatime", str(image), str(workdir)
            )
        return workdir

    async def release(self, workdir: Path) -> None:
        """Unmount a kept working directory whose kernel ended with the service (`reopen`
        mounts it again): nothing stays mounted for a service that is not running. Not one
        a kept kernel still has bind-mounted: two mounts of one image would corrupt it."""
        if os.path.ismount(workdir):
            await _unmount(workdir)

    async def create(self, throwaway: bool = False, under: Path | None = None) -> tuple[str, Path]:
        """A new, empty working directory: (its id, its path). `throwaway`: for one request,
        never kept past the service (a tmpfs where directories are filesystems). `under`:
        a plain directory there instead (where the backend's kernels reach nothing else; its
        size is measured, see quota.py)."""
        wid = uuid.uuid4().hex
        home = (under or self.root) / wid
        workdir = home / "work"
        workdir.mkdir(parents=True)
        if self.enforced and under is None:
            try:
                if throwaway:
                    await asyncio.to_thread(self._mount_tmpfs, workdir)
                else:
                    await self._make_filesystem(home / IMAGE, workdir)
            except BaseException:
                await self.remove(workdir)
                raise
        return wid, workdir

    async def remove(self, workdir: Path) -> None:
        """Remove a working directory and everything in it, however deep or large."""
        home = workdir.parent
        if os.path.ismount(workdir):
            await _unmount(workdir)
        await self.io.run(home.name, files.remove_tree, home, timeout=600)

    def workspace(self, workdir: Path, key: str, limits: files.FileLimits) -> Workspace:
        """How the host reaches the files of a working directory made here (and removes it)."""
        own = self.enforced and workdir.parent.parent == self.root  # not one made `under`
        return Workspace(workdir, self.io, key, limits, own_filesystem=own, workdirs=self)

    async def close(self) -> None:
        """Let go of the data directory. Working directories stay (their sessions outlive
        the service: see store.py); each was removed with its session, and the warm
        kernels' with the pool."""
        os.close(self._lock_fd)

    async def _make_filesystem(self, image: Path, workdir: Path) -> None:
        assert self.disk_bytes
        with open(image, "wb") as f:
            f.truncate(self.disk_bytes)  # sparse: the host's disk is used as the code writes
        await _run(
            "mkfs.ext4", "-q", "-F", "-m", "0", "-N", str(self._inodes),
            "-O", "^has_journal,^resize_inode",
            "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            str(image),
        )  # fmt: skip
        await _run(
            "mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noatime", str(image), str(workdir)
        )
        os.rmdir(workdir / "lost+found")  # root's, so the kernel could not remove it

    def _mount_tmpfs(self, workdir: Path) -> None:
        options = f"size={self.disk_bytes},nr_inodes={self._inodes},mode=0755"
        flags = _MS_NOSUID | _MS_NODEV | _MS_NOATIME
        if _libc.mount(b"tmpfs", str(workdir).encode(), b"tmpfs", flags, options.encode()):
            code = ctypes.get_errno()
            raise OSError(code, f"mount tmpfs on {workdir}: {os.strerror(code)}")

    async def _unmount_below(self, top: Path) -> None:
        prefix = str(top) + "/"
        for point in sorted(_mount_points(), reverse=True):
            if point.startswith(prefix):
                await _unmount(Path(point))


def _cannot_mount() -> str | None:
    """Why a loop-mounted filesystem per working directory is not possible here, or None."""
    if os.geteuid() != 0:
        return "the service is not root"
    for tool in ("mkfs.ext4", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control)"
    return None


def _mount_points() -> list[str]:
    try:
        with open("/proc/self/mountinfo") as f:
            # 5th field: the mount point, with spaces and such octal-escaped
            return [
                line.split()[4].encode().decode("unicode_escape")
                for line in f
                if len(line.split()) > 4
            ]
    except OSError:
        return []


async def _unmount(point: Path) -> None:
    """Unmount; lazily if something still holds it. A loop device goes with its filesystem
    (mount -o loop sets it to clear itself)."""
    await asyncio.to_thread(_umount2, point)


def _umount2(point: Path) -> None:
    target = str(point).encode()
    if _libc.umount2(target, 0) == 0:
        return
    if ctypes.get_errno() == errno.EBUSY and _libc.umount2(target, _MNT_DETACH) == 0:
        return
    code = ctypes.get_errno()
    raise OSError(code, f"umount {point}: {os.strerror(code)}")


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode:
        raise OSError(
            errno.EIO,
            f"{argv[0]} failed ({proc.returncode}): {err.decode(errors='replace').strip()}",
        )
