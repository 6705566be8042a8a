"""Fork-server template: runs *inside* the sandbox and forks one child per stateless run.

Standalone on purpose, like kernel_boot.py next to it (stdlib + that file only): the Docker
image copies both into /opt/kernelbox. Usage:

    python forkserver_boot.py --socket PATH --runs DIR [--uid-base N | --isolate]
                              [--slots N] [--prefork N] [--kernels DIR]

The template imports the data stack once (nothing that holds threads, sockets or event loops:
the loop below is `selectors`, never asyncio, whose running-loop state a child would inherit),
freezes its heap for the GC, then serves requests on a unix socket. One connection per run:

    service -> template   4-byte big-endian length + JSON header {"op": "run", "timeout": s,
                          "fetch": bool, "memory": bytes|null}, sent with SCM_RIGHTS carrying
                          [request, stdin, stdout, stderr, result]: two memfds the service
                          filled (the request JSON {code, files, fetch_files}; stdin), the
                          write ends of two pipes, and an empty memfd for what comes back.
    template -> service   one JSON line when the run is over: {"exit": code|null,
                          "signal": n|null, "timeout": bool, "elapsed": s}

With `--kernels DIR` (the Docker backend's one-shot kernels, with `--uid-base`) the template
also imports what an ipykernel needs (kernel_boot.KERNEL_PRELOAD) and serves a second op: a
child that becomes a full kernel instead of running code.

    service -> template   {"op": "kernel", "uid": n, "timeout": s} with the same five fds:
                          the request memfd holds {"argv", "env", "workdir"} (the kernel's
                          command line, its environment, its working directory under DIR,
                          made and given to that uid by the service); stdout and stderr may
                          be one pipe (what the kernel prints outside the protocol); the
                          result memfd gets "E<reason>" if its set-up fails.
    service -> template   "I" on the same connection: interrupt (SIGINT to its group)
    service -> template   EOF (shutdown of the service's side): kill it
    template -> service   the same JSON line when it has ended, once what it left is swept

The uid comes from the service, which gives the kernel its directories before the fork; the
template takes it only if it is in its range and no live run has it (the ping says the range).

The template never reads a run's code, files or output: the child reads its request memfd and
a fetch helper writes the fetched files into the result memfd. So the template's memory, which
every later child inherits, holds nothing of any run.

Each child: its own session (killed as a group), its own empty 0700 working directory, a
scrubbed environment, rlimits, umask 077, stdin/stdout/stderr from the request, then the code
runs as `__main__` the way `python file.py` runs it (return code 1 and the traceback on stderr
for an uncaught exception; SystemExit honoured). With `--uid-base` (the Docker backend, where
the template is root in its container with CAP_SETUID and CAP_SETGID only) every concurrent
run also gets its own uid and gid from a range, so runs cannot signal, trace or read each
other, and no SysV IPC; the template sweeps what a run left in the shared temporary
directories, acting as the owner of what it kills and removes (`acting_as`).

With `--isolate` (the local backend's bwrap sandbox, where every run has the template's uid)
every run gets namespaces of its own instead: user, mount, PID, IPC and network. The template
first enters a user namespace of its own, keeping its capabilities there, and becomes PID 1 of
a PID namespace of its own (see `isolated_template`). For each child it forks ahead of demand
it makes a fresh PID namespace whose PID 1 is a tiny init (`RUN_INIT`), forks the child into it
as PID 2, and returns to its own. The child mounts a /proc of that namespace, fresh /tmp and
/dev/shm in which only its own working directory is bound back, hides the template's runtime
directory, enters new user, IPC and network namespaces and drops every capability (see
`isolate_run`). So a run cannot see, signal or reach another run or the template, and when it
ends, killing its init takes every process it left with it.

At the deadline the child's process group is killed; when a run ends, whatever it left behind
is killed too: the template is a child subreaper, so orphans of a run become its children and
are found by uid (Docker) or session (local, without --isolate). gVisor has no subreapers:
there a run's orphans are found by uid among all the container's processes.

Configuration from the environment (removed once read):
    KERNELBOX_RUN_AS        "uid:gid" (--isolate, root service): become them first thing
    KERNELBOX_MPL_CACHE     a prebuilt matplotlib cache, copied into MPLCONFIGDIR
    KERNELBOX_RLIMITS       JSON rlimits for every child (see kernel_boot.apply_rlimits)
    KERNELBOX_NPROC         per-run process limit (with per-run uids or --isolate)
    KERNELBOX_NICE          niceness added to every child (not the template: every run waits
                            for its fork, so it must not queue behind the runs' code)
    KERNELBOX_UNSHARE_NET   "1": the template (and so every child) leaves the host network
    KERNELBOX_HUGEPAGES     "1": once the imports are done, collapse the template's private
                            memory into huge pages (see collapse_to_huge_pages)
    KERNELBOX_PRELOAD       comma-separated modules imported once by the template
    KERNELBOX_SWEEP         colon-separated shared directories cleaned of a run's files
    KERNELBOX_FETCH_CAP     bytes of fetched files returned per run at most
    KERNELBOX_PARENT_PID    the template dies with this process (see kernel_boot.py)
"""

from __future__ import annotations

import argparse
import binascii
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NoReturn

from kernel_boot import (
    apply_rlimits,
    become,
    check_libc,
    drop_capabilities,
    loopback_up,
    own_user_namespace,
    seed_matplotlib_cache,
    unshare_network,
)

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
HEADER_MAX = 64 * 1024
#: a kernel's connection file, relative: found in the directory JUPYTER_RUNTIME_DIR names
KERNEL_CONNECTION_FILE = "connection.json"
N_FDS = 5  # request, stdin, stdout, stderr, result
# bwrap covers parts of its /proc read-only; while those covers are there, no process in a user
# namespace of ours may mount a /proc of its own (the mount would reveal what they hide).
PROC_COVERS = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus")
# PID 1 of a run's PID namespace. It must not be the run: a PID 1 ignores the signals it has no
# handler for, so `os.kill(os.getpid(), SIGKILL)` would do nothing. One exec, the cheapest that
# waits: it does not reap, so an orphan of the run that ends stays a zombie (counted in the
# run's process limit) until the run ends and the namespace goes. (A shell that ignores SIGCHLD
# first, so they are reaped at once, costs 0.7 ms of CPU more per run.)
RUN_INIT = ["/bin/sleep", "2147483647"]
#: exit code of a child whose set-up failed (its reason is in the result memfd, after "E")
SETUP_FAILED = 255
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"

_libc = ctypes.CDLL(None, use_errno=True)
# Reported to the service, which warns when an image holds another version of this file.
with open(__file__, "rb") as _f:
    BOOT_SHA = hashlib.sha256(_f.read()).hexdigest()


def _log(message: str) -> None:
    print(f"kernelbox-forkserver: {message}", file=sys.stderr, flush=True)


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    encode = lambda v: v.encode() if v else None  # noqa: E731
    check_libc(
        _libc.mount(encode(source), target.encode(), encode(fstype), flags, encode(data)),
        f"mount {target}",
    )


def _exit_as(status: int) -> None:
    """End this process as the one whose wait status this is ended."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)


def isolated_template(run_as: str) -> None:
    """With --isolate, first thing: make this process able to give each run namespaces of its
    own. A root service's template (bwrap as root, with CAP_SETUID, CAP_SETGID and
    CAP_SYS_ADMIN) removes bwrap's covers over /proc (see PROC_COVERS), then becomes `run_as`,
    losing all three. Then a user namespace of our own (every capability in it, over nothing
    outside) with a mount and a PID namespace: returns in the template proper, forked as PID
    1 of that namespace with a /proc of it; the calling process waits and ends as it ends."""
    if run_as:
        for path in PROC_COVERS:
            _libc.umount2(path.encode(), MNT_DETACH)  # not all of them exist everywhere
        become(*(int(part) for part in run_as.split(":")))
    own_user_namespace(CLONE_NEWNS | CLONE_NEWPID)
    pid = os.fork()
    if pid:
        _exit_as(os.waitpid(pid, 0)[1])
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def fork_in_new_pid_namespace(own_pid_ns: int) -> tuple[int, int]:
    """Fork, as os.fork, but into a fresh PID namespace: its PID 1 a RUN_INIT, the child its PID
    2. Returns (init's pid, child's pid), the child's 0 in the child. The caller's later
    children are born in its own namespace (`own_pid_ns`, an fd of it) again."""
    check_libc(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")

    def back() -> None:
        check_libc(_libc.setns(own_pid_ns, CLONE_NEWPID), "setns(CLONE_NEWPID)")

    try:
        init = os.posix_spawn(RUN_INIT[0], RUN_INIT, {"PATH": "/usr/bin:/bin"})
        pid = os.fork()
    except BaseException:
        back()
        raise
    if pid:  # never in the child: its own children must stay in its namespace
        back()
    return init, pid


#: where a run may write and fetch files by absolute path (SandboxFusion's `/mnt/b`): its own
#: scratch directories, empty at its start. With --isolate they are one fresh tmpfs per run
#: (see make_scratch); with per-run uids, the container's tmpfs mounts, swept after each run.
SCRATCH_ROOTS = ("/tmp", "/mnt", "/data")


def scratch_for(workdir: str) -> str:
    """--isolate: the per-run tmpfs behind /tmp, /mnt and /data, next to its working directory
    in the template's runs directory (which the run never sees)."""
    return f"{workdir}.s"


def make_scratch(path: str, size: int) -> None:
    """--isolate, in the template's mount namespace: a tmpfs of `size` bytes at `path` with one
    directory per SCRATCH_ROOTS entry. It outlives the run, so the fetch helper sees what the
    run left there; the template unmounts it when the run is over (drop_scratch)."""
    os.mkdir(path, 0o700)
    _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0700,size={size}")
    for root in SCRATCH_ROOTS:
        os.mkdir(os.path.join(path, root.strip("/")), 0o700)
        os.chmod(os.path.join(path, root.strip("/")), 0o1777)


def drop_scratch(path: str) -> None:
    _libc.umount2(path.encode(), MNT_DETACH)  # everything in it is freed with it
    with contextlib.suppress(OSError):
        os.rmdir(path)


def environment_under(roots: tuple[str, ...]) -> list[str]:
    """The interpreter's own directories (its prefixes and import path) that lie under one of
    `roots`, outermost only: a run's fresh /tmp would hide an environment installed in /tmp,
    and with it every module the template had not imported yet."""
    found = set()
    for path in {sys.prefix, sys.exec_prefix, sys.base_prefix, *sys.path}:
        real = os.path.realpath(path) if path else ""
        if real and os.path.isdir(real) and any(real.startswith(r + "/") for r in roots):
            found.add(real)
    return sorted(p for p in found if not any(p.startswith(q + "/") for q in found))


def isolate_run(workdir: str, cfg: Config, fresh_proc: bool = True) -> None:
    """In a child of an --isolate template, before any code of a run: a mount namespace with a
    /proc of the run's PID namespace (made by the template), its own /tmp, /mnt and /data (its
    scratch tmpfs, see make_scratch), fresh size-limited /dev/shm and runs directory (the
    runs directory is /tmp on the local backend), in which only `workdir` is bound back (it
    stays in the template's runs directory, for the fetch helper and the removal), the runtime
    directory hidden; then new user, IPC and network namespaces (only loopback, up) and no
    capability at all. The fetch helper does the same without the /proc."""
    check_libc(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Opened in the new mount namespace (a bind's source must be one of its mounts), before
    # the fresh runs directory hides it.
    keep = os.open(workdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    scratch = scratch_for(workdir)
    own = {
        root: os.open(os.path.join(scratch, root.strip("/")), os.O_PATH | os.O_DIRECTORY)
        for root in SCRATCH_ROOTS
    }
    environment = [
        (path, os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) for path in cfg.environment
    ]
    if fresh_proc:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # /tmp, /mnt and /data: the run's own tmpfs (they outlive the run, for the fetch helper)
    for root, fd in own.items():
        _mount(f"/proc/self/fd/{fd}", root, None, MS_BIND)
        os.close(fd)
    fresh = f"mode=1777,size={cfg.tmp_bytes}"
    for path in dict.fromkeys(("/dev/shm", cfg.runs_dir)):
        if path not in SCRATCH_ROOTS:
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, fresh)
    _mount("tmpfs", cfg.hide_dir, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0555")
    os.makedirs(workdir, 0o700, exist_ok=True)  # the fetch helper finds the run's mountpoint
    _mount(f"/proc/self/fd/{keep}", workdir, None, MS_BIND)
    os.close(keep)
    for path, fd in environment:  # back over the fresh mounts, read-only as it was
        os.makedirs(path, 0o755, exist_ok=True)
        # Recursive: a bind that left out the (locked) mounts below it would be refused.
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    own_user_namespace(CLONE_NEWIPC | CLONE_NEWNET)
    loopback_up()  # the run's own 127.0.0.1 and ::1, and no other interface
    drop_capabilities()


MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux 6.1+
_HUGE = 2 * 1024**2


def collapse_to_huge_pages() -> tuple[int, str]:
    """Back the template's private anonymous memory (the interpreter's heap and arenas, the
    data stack's buffers) with transparent huge pages, now that it holds what every child
    inherits: each fork then copies a page-table entry per 2 MiB instead of per 4 KiB, and each
    child's exit frees as few. Returns the bytes collapsed and why some were not (the last
    refusal); where the kernel refuses (older than 6.1, THP disabled, gVisor), nothing
    changes."""
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done, refused = 0, ""
    with open("/proc/self/maps") as maps:
        lines = maps.readlines()
    for line in lines:
        fields = line.split()
        name = fields[5] if len(fields) > 5 else ""
        if fields[1] != "rw-p" or name not in ("", "[heap]"):
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        lo, hi = -(-lo // _HUGE) * _HUGE, hi // _HUGE * _HUGE
        if hi <= lo:
            continue
        for advice, name in ((MADV_HUGEPAGE, "MADV_HUGEPAGE"), (MADV_COLLAPSE, "MADV_COLLAPSE")):
            if _libc.madvise(lo, hi - lo, advice) != 0:
                refused = f"madvise({name}): {os.strerror(ctypes.get_errno())}"
                break
        else:
            done += hi - lo
    return done, refused


@contextlib.contextmanager
def acting_as(uid: int | None) -> Iterator[None]:
    """Act with `uid` as effective uid (the real and saved uids stay the template's), for a kill
    or a removal. A Docker template keeps only CAP_SETUID and CAP_SETGID: it reaches a run's
    processes and files as their owner does, not through CAP_KILL or CAP_DAC_OVERRIDE. The
    run cannot signal or trace the template meanwhile: those checks look at its real and saved
    uids."""
    previous = os.geteuid()
    if uid is None or uid == previous:
        yield
        return
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(previous)


def remove_tree(path: str) -> None:
    """Remove `path` and everything under it, whoever owns what, without CAP_DAC_OVERRIDE:
    each directory is opened up (owner bits only: others keep the access they had, which is
    how they reached what they put inside) and emptied acting as its owner, each entry removed
    acting as the owner of its directory (who may, sticky bit or not). Errors are ignored, as
    rmtree's ignore_errors=True would: what cannot be removed stays. Iterative: a run may nest
    deep."""
    try:
        top = os.lstat(path)
        above = os.lstat(os.path.dirname(path) or ".").st_uid
    except OSError:
        return
    if not stat.S_ISDIR(top.st_mode):
        _remove_entry(path, False, above)
        return
    todo = [(path, top.st_uid, above)]  # directories to empty: (path, owner, parent's owner)
    emptied: list[tuple[str, int]] = []
    while todo:
        directory, owner, parent_owner = todo.pop()
        try:
            with acting_as(owner):
                mode = stat.S_IMODE(os.lstat(directory).st_mode)
                if mode & 0o700 != 0o700:
                    os.chmod(directory, mode | 0o700)
                entries = [(e.path, e.stat(follow_symlinks=False)) for e in os.scandir(directory)]
        except OSError:
            continue
        emptied.append((directory, parent_owner))
        for entry, st in entries:
            if stat.S_ISDIR(st.st_mode):
                todo.append((entry, st.st_uid, owner))
            else:
                _remove_entry(entry, False, owner)
    for directory, parent_owner in reversed(emptied):  # children before their parents
        _remove_entry(directory, True, parent_owner)


def _remove_entry(path: str, is_dir: bool, parent_owner: int) -> None:
    try:
        with acting_as(parent_owner):
            (os.rmdir if is_dir else os.unlink)(path)
    except OSError:
        pass


_FIRST_RUN_UID = 10_000  # below: the image's users (the kernels' sandbox user is 1000)


def fit_uid_range(base: int, count: int) -> int:
    """`base` when the uids and gids base .. base+count-1 exist in this user namespace; else
    a random base where they do, above the image's own users (a container of an engine with
    userns-remap has 65536 ids, not 2**32)."""
    extents = []
    for kind in ("uid", "gid"):
        with open(f"/proc/self/{kind}_map") as f:
            extents.append([(int(first), int(n)) for first, _, n in map(str.split, f)])

    def fits(b: int) -> bool:
        return all(any(lo <= b and b + count <= lo + n for lo, n in ext) for ext in extents)

    if fits(base):
        return base
    lo, n = max(extents[0], key=lambda extent: extent[1])
    room = n - _FIRST_RUN_UID - count
    for _ in range(100) if room > 0 else ():
        candidate = lo + _FIRST_RUN_UID + int.from_bytes(os.urandom(4), "big") % room
        if fits(candidate):
            return candidate
    raise SystemExit(f"kernelbox-forkserver: no {count} uids and gids free in this namespace")


def _random_name(n: int = 8) -> str:
    # tempfile's alphabet and length, so working directories and code files look the same as
    # SandboxFusion's (/tmp/tmpk3j_x0a1/tmpa8d9f2ew.py).
    return "".join(_NAME_CHARS[b % len(_NAME_CHARS)] for b in os.urandom(n))


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def safe_path(path: str, absolute_ok: bool) -> str:
    """A relative path (inside the working directory) or, when `absolute_ok`, an absolute one
    under a SCRATCH_ROOTS entry; normalised, never with `..` (the service checks it first)."""
    if not path.startswith("/"):
        return safe_relative(path)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if "\x00" in path or ".." in parts or len(parts) < 2 or f"/{parts[0]}" not in SCRATCH_ROOTS:
        raise ValueError(f"not a path under {', '.join(SCRATCH_ROOTS)}: {path!r}")
    if not absolute_ok:
        raise ValueError(f"absolute paths need a sandboxed fork server: {path!r}")
    return "/" + "/".join(parts)


def open_beneath(path: str, flags: int, create_dirs: bool = False) -> int:
    """Open `path` (from safe_path; relative ones from the working directory) never following a
    link, in a directory or at the end: one component at a time, each O_NOFOLLOW. Parents are
    made (0700) with `create_dirs`. Non-blocking, so a FIFO cannot hold the caller."""
    parts = path.split("/")
    start = "/" if path.startswith("/") else "."
    parts = [p for p in parts if p]
    dirfd = os.open(start, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)
            except FileNotFoundError:
                if not create_dirs:
                    raise
                os.mkdir(part, 0o700, dir_fd=dirfd)
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)
            os.close(dirfd)
            dirfd = nxt
        fd = os.open(
            parts[-1], flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=dirfd
        )
    finally:
        os.close(dirfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"not a regular file: {path!r}")
    return fd


def safe_relative(path: str) -> str:
    """A plain relative path inside the working directory (the service checks it first)."""
    if not path or "\x00" in path or path.startswith(("/", "~")):
        raise ValueError(f"not a relative path: {path!r}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"not a path inside the working directory: {path!r}")
    return "/".join(parts)


@dataclass
class Config:
    runs_dir: str
    uid_base: int | None
    slots: int
    rlimits: dict[str, int]
    nproc: int | None
    nice: int
    prefork: int
    sweep_dirs: list[str]
    fetch_cap: int
    #: namespaces per run (see isolate_run); then the template's runtime directory, hidden from
    #: runs, and the size of each run's fresh /tmp and /dev/shm
    isolate: bool = False
    hide_dir: str = ""
    tmp_bytes: int = 64 * 1024**2
    #: whether orphans of runs become the template's children (not in gVisor)
    subreaper: bool = True
    #: --kernels: the directory under which kernels' working directories are ("": no kernels)
    kernel_root: str = ""
    #: the interpreter's directories that a run's fresh mounts would hide (see isolate_run),
    #: found once by the template rather than by every run
    environment: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.environment = environment_under((*SCRATCH_ROOTS, "/dev/shm", self.runs_dir))


@dataclass
class Idle:
    """A child forked ahead of demand, waiting on `chan` for a run."""

    pid: int
    chan: socket.socket
    #: --isolate: its working directory (made before it isolated itself) and its PID 1
    workdir: str | None = None
    init: int | None = None


@dataclass
class Run:
    conn: socket.socket
    pid: int
    uid: int | None
    workdir: str
    started: float
    deadline: float
    req_fd: int
    result_fd: int
    fetch: bool = False
    init: int | None = None  # PID 1 of the run's PID namespace (--isolate)
    timed_out: bool = False
    status: int | None = None  # raw wait status of the child
    elapsed: float = 0.0
    helper: int | None = None
    helper_deadline: float = 0.0
    kernel: bool = False  # a kernel (--kernels), not a run of code
    hung_up: bool = False  # the service closed its side: nobody to interrupt


@dataclass
class Pending:
    conn: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)


def _received_fds(ancdata: list) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += struct.unpack(f"{usable // 4}i", payload[:usable])
    return fds


def _processes() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat_field(pid: int, index: int) -> int | None:
    """Numeric field `index` after the command in /proc/PID/stat (1: ppid, 4: session), or
    None for a process that is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[index])
    except (OSError, ValueError, IndexError):
        return None


def _real_uid(pid: int) -> int | None:
    """The real uid of a live process (None: gone, or a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        if status.get("State", "").split()[:1] == ["Z"]:
            return None
        return int(status["Uid"].split()[0])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _wait_gone(pid: int, deadline: float) -> None:
    while _stat_field(pid, 1) is not None and time.monotonic() < deadline:
        time.sleep(0.001)


# -- the child ---------------------------------------------------------------------------------


# SysV IPC (and POSIX message queues): objects that outlive processes and that all runs of a
# container share, so a later run with a reused uid could attach to an earlier one's. Runs
# with uids of their own get ENOSYS from the calls that create or find them. (Docker's sysctls
# in forkserver.NO_SYSV_IPC say the same under runc; gVisor ignores sysctls.)
_IPC_CALLS = {
    0xC000003E: (29, 64, 68, 240),  # AUDIT_ARCH_X86_64: shmget semget msgget mq_open ...
    0x40000003: (117, 393, 395, 399, 277),  # ... i386 on it: ipc semget shmget msgget mq_open
    0xC00000B7: (194, 190, 186, 180),  # AUDIT_ARCH_AARCH64: shmget semget msgget mq_open
}
_X32 = 0x40000000  # x32 system calls: the x86_64 numbers with this bit, same arch
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def deny_ipc() -> None:
    """Install the seccomp filter described at _IPC_CALLS in this process (and its children)."""
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | 38  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO|ENOSYS
    ops: list[list[int]] = []
    to_deny: list[int] = []
    for arch, calls in _IPC_CALLS.items():
        numbers = [*calls, *(n | _X32 for n in calls)] if arch == 0xC000003E else list(calls)
        ops += [[ld, 0, 0, 4], [jeq, 0, len(numbers) + 2, arch], [ld, 0, 0, 0]]  # arch? nr
        for nr in numbers:
            to_deny.append(len(ops))
            ops.append([jeq, 0, 0, nr])
        ops.append([ret, 0, 0, allow])
    ops += [[ret, 0, 0, allow], [ret, 0, 0, deny]]
    for i in to_deny:
        ops[i][1] = len(ops) - 1 - (i + 1)  # jump to the last instruction: deny
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in ops))
    prog = _SockFprog(len(ops), ctypes.addressof(code))
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter refused")


def _become(uid: int | None) -> None:
    """Session of its own; with a uid, drop every privilege for good (no capabilities left)
    and lose SysV IPC."""
    os.setsid()
    if uid is not None:
        become(uid, uid)
        deny_ipc()
    # Set after the uid change (which clears it): the run dies with the template.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _reset_signals() -> None:
    """Undo the template's handlers (SIGPIPE and SIGXFSZ stay ignored, as in any Python)."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _close_fds_except(keep: int) -> None:
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 20)


def _enter(run_uid: int | None, fds: list[int]) -> dict:
    """A child's first steps, a run's or a kernel's: its uid, its request, its stdio, no other
    descriptor open but the result memfd."""
    req_fd, stdin_fd, out_fd, err_fd, result_fd = fds
    _reset_signals()
    _become(run_uid)
    request = json.loads(_read_all(req_fd))
    os.dup2(stdin_fd, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    _close_fds_except(result_fd)
    os.umask(0o077)
    try:  # when memory runs out, a run goes first, never the template
        _write_file("/proc/self/oom_score_adj", b"1000")
    except OSError:
        pass
    return request


def _setup_failed(result_fd: int, exc: BaseException) -> NoReturn:
    """The child's set-up failed: say why in the result memfd, exit SETUP_FAILED."""
    try:
        _write_all(result_fd, f"E{exc.__class__.__name__}: {exc}".encode())
    finally:
        os._exit(SETUP_FAILED)


def child_main(cfg: Config, run_uid: int | None, workdir: str, fds: list[int], memory: int | None):
    """Runs in the forked child; never returns."""
    result_fd = fds[4]
    try:
        request = _enter(run_uid, fds)
        if not cfg.isolate:  # isolated, the child made it before isolating itself
            os.mkdir(workdir, 0o700)
        os.chdir(workdir)
        absolute_ok = cfg.isolate or cfg.uid_base is not None  # scratch that is the run's
        for name, content in request.get("files", {}).items():
            fd = open_beneath(
                safe_path(name, absolute_ok),
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                create_dirs=True,
            )
            try:
                _write_all(fd, binascii.a2b_base64(content))
            finally:
                os.close(fd)
        script = os.path.join(workdir, f"tmp{_random_name()}.py")
        _write_file(script, request["code"].encode("utf-8", "surrogatepass"))
        # The rest of the environment is the template's (see main): set, not rebuilt, as
        # every page a child writes is a page copied.
        os.environ.update(HOME=workdir, TMPDIR=workdir, PWD=workdir)
        rlimits = dict(cfg.rlimits)
        if memory:
            rlimits["AS"] = min(memory, rlimits.get("AS", memory))
        if cfg.nproc and (run_uid is not None or cfg.isolate):  # counted per uid or userns
            rlimits["NPROC"] = cfg.nproc
        apply_rlimits(rlimits)
        if cfg.nice:
            os.nice(cfg.nice)  # code yields the CPU to the service and the template
    except BaseException as exc:
        _setup_failed(result_fd, exc)
    os.close(result_fd)
    if request.get("language") == "pytest":
        os._exit(run_pytest(script, [str(a) for a in request.get("args") or []]))
    os._exit(run_main(script, request["code"]))


def kernel_child_main(cfg: Config, run_uid: int | None, scratch: str, fds: list[int]) -> None:
    """A forked child that becomes a kernel (--kernels); never returns. Its scratch directory
    (TMPDIR, IPYTHONDIR, MPLCONFIGDIR) is its own, as a run's working directory is: the
    container's /tmp is shared by every kernel and run of the template."""
    from kernel_boot import harden, run_kernel

    result_fd = fds[4]
    try:
        request = _enter(run_uid, fds)
        os.mkdir(scratch, 0o700)
        workdir = os.path.normpath(request["workdir"])
        if not workdir.startswith(cfg.kernel_root + "/"):
            raise ValueError(f"{workdir!r} is not under {cfg.kernel_root}")
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.update(
            TMPDIR=scratch, IPYTHONDIR=f"{scratch}/ipython", MPLCONFIGDIR=f"{scratch}/matplotlib"
        )
        os.mkdir(os.environ["MPLCONFIGDIR"])
        if cfg.nproc and run_uid is not None:
            apply_rlimits({"NPROC": cfg.nproc})
        if "numpy" in sys.modules:
            _reseed_numpy(sys.modules["numpy"])
        gc.enable()  # the template's is off; a kernel lives long enough to need it
        caps = harden()  # niceness, umask, rlimits from the request's environment
    except BaseException as exc:
        _setup_failed(result_fd, exc)
    os.close(result_fd)
    try:
        run_kernel(request["argv"], caps)
    except SystemExit as exc:
        os._exit(_finish(_exit_code(exc)))
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(_finish(1))
    os._exit(_finish(0))


def _fresh_stdio() -> None:
    """Stdio objects over fds 0-2 configured as the interpreter configures them for pipes;
    made once in the template, so a child only has to dup2 its own pipes onto fds 0-2."""
    import io

    sys.stdin = sys.__stdin__ = io.TextIOWrapper(
        io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8"
    )
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8"
    )
    # stderr is line-buffered and never fails on encoding, as in any Python >= 3.9.
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )


def run_main(script: str, source: str) -> int:
    """Run `source` as `python script` would; return the process's exit code."""
    import builtins
    import threading
    import types

    sys.argv = [script]
    sys.path[0] = os.path.dirname(script)  # the script's directory, not this file's
    main = types.ModuleType("__main__")
    main.__file__ = script
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    if "numpy" in sys.modules:
        _reseed_numpy(sys.modules["numpy"])
    gc.enable()
    code = 0
    try:
        try:
            compiled = compile(source, script, "exec")
        except SyntaxError as exc:
            sys.excepthook(type(exc), exc.with_traceback(None), None)
            return _finish(1)
        exec(compiled, main.__dict__)
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException as exc:
        # Without this frame, as the interpreter prints it (the hook reads __traceback__).
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        code = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # join non-daemon threads
    except BaseException:
        pass
    return _finish(code)


def run_pytest(script: str, args: list[str]) -> int:
    """Run the tests in `script` as `pytest script *args` would, from the working directory;
    return pytest's exit code (0 all passed, 1 some failed, 5 none collected, ...)."""
    sys.argv = ["pytest", script, *args]
    sys.path[0] = os.path.dirname(script)
    if "numpy" in sys.modules:
        _reseed_numpy(sys.modules["numpy"])
    gc.enable()
    try:
        import pytest

        code = int(pytest.main([script, *args]))
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code = 1
    return _finish(code)


def _reseed_numpy(np) -> None:
    """Python's `random` reseeds itself in a forked child; numpy's global state does not.
    A whole Mersenne Twister state from the OS: as random as `seed()`, for a third of the
    pages it writes (every page a child writes is copied)."""
    try:
        key = np.frombuffer(os.urandom(624 * 4), dtype=np.uint32)
        np.random.mtrand._rand.set_state(("MT19937", key, 624, 0, 0.0))
    except Exception:
        np.random.seed()


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    try:
        print(exc.code, file=sys.stderr)
    except BaseException:
        pass
    return 1


def _finish(code: int) -> int:
    import atexit

    try:
        atexit._run_exitfuncs()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            code = code or 120  # what the interpreter returns when flushing stdio fails
    return code


def helper_main(run: Run, cfg: Config) -> None:
    """Forked after a run: read its fetch_files, as its own uid, into the result memfd."""
    try:
        _become(run.uid)
        if cfg.isolate:  # what the run saw, no more: its links lead nowhere else
            isolate_run(run.workdir, cfg, fresh_proc=False)
        request = json.loads(_read_all(run.req_fd))
        _close_fds_except(run.result_fd)
        os.chdir(run.workdir)
        budget = cfg.fetch_cap
        out = [b"F"]
        absolute_ok = cfg.isolate or cfg.uid_base is not None
        for name in request.get("fetch_files", []):
            try:
                fd = open_beneath(safe_path(name, absolute_ok), os.O_RDONLY)
                with open(fd, "rb") as f:
                    if os.fstat(f.fileno()).st_size > budget:
                        continue
                    data = f.read(budget + 1)
            except (OSError, ValueError):
                continue  # missing, a directory, unreadable: omitted, as SandboxFusion does
            if len(data) > budget:
                continue
            budget -= len(data)
            raw = name.encode("utf-8", "surrogatepass")
            out += [struct.pack("!IQ", len(raw), len(data)), raw, data]
        _write_all(run.result_fd, b"".join(out))
    except BaseException:
        os._exit(1)
    os._exit(0)


# -- the template ------------------------------------------------------------------------------


class Template:
    def __init__(self, cfg: Config, listener: socket.socket) -> None:
        self.cfg = cfg
        self.listener = listener
        self.sel = selectors.DefaultSelector()
        self.runs: dict[int, Run] = {}  # by child pid
        self.helpers: dict[int, Run] = {}  # by helper pid
        self.idle: list[Idle] = []  # pre-forked children, waiting
        self.free_uids = list(range(cfg.uid_base, cfg.uid_base + cfg.slots)) if cfg.uid_base else []
        self.stopping = False
        self.me = os.getpid()
        # --isolate: where to come back to after making a PID namespace for a child; and fds
        # received close on exec, so no run's init (an exec) holds another run's pipes open
        self.pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC) if cfg.isolate else 0
        self.recv_flags = socket.MSG_CMSG_CLOEXEC if cfg.isolate else 0
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.sel.register(listener, selectors.EVENT_READ, "listen")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")

    def _stop(self, *_args) -> None:
        self.stopping = True

    # -- loop ------------------------------------------------------------------------------

    def serve(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            deadlines = [r.deadline for r in self.runs.values() if r.status is None]
            deadlines += [r.helper_deadline for r in self.helpers.values()]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            for key, _ in self.sel.select(timeout):
                if key.data == "listen":
                    self._accept()
                elif key.data == "wake":
                    self._drain_wakeups()
                elif isinstance(key.data, Pending):
                    self._receive(key.data)
                else:
                    self._cancelled(key.data)
            self._reap()
            self._enforce_deadlines()
            if len(self.idle) < self.cfg.prefork // 2:
                self._spawn_idle(self.cfg.prefork - len(self.idle))
        self._shutdown()

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                _log(f"accept failed: {exc}")
                return
            conn.setblocking(False)
            self.sel.register(conn, selectors.EVENT_READ, Pending(conn))

    def _receive(self, pending: Pending) -> None:
        conn = pending.conn
        try:
            data, ancdata, _flags, _addr = conn.recvmsg(
                HEADER_MAX, socket.CMSG_SPACE(N_FDS * 4), self.recv_flags
            )
        except BlockingIOError:
            return
        except OSError:
            data, ancdata = b"", []
        pending.fds += _received_fds(ancdata)
        pending.buf += data
        size = struct.unpack("!I", pending.buf[:4])[0] if len(pending.buf) >= 4 else None
        if not data or (size is not None and size > HEADER_MAX):
            self._drop(pending)
            return
        if size is None or len(pending.buf) < 4 + size:
            return
        try:
            header = json.loads(pending.buf[4 : 4 + size])
        except ValueError:
            self._drop(pending)
            return
        op = header.get("op")
        if op == "ping":
            reply = {"ok": True, "pid": self.me, "slots": self.cfg.slots, "boot_sha256": BOOT_SHA}
            reply.update(uid_base=self.cfg.uid_base, kernels=bool(self.cfg.kernel_root))
            self._reply(conn, reply)
            self._drop(pending)
        elif (op == "run" or (op == "kernel" and self.cfg.kernel_root)) and len(
            pending.fds
        ) == N_FDS:
            self.sel.unregister(conn)
            self._start(conn, header, pending.fds)
        else:
            self._reply(conn, {"error": "bad request"})
            self._drop(pending)

    def _drop(self, pending: Pending) -> None:
        for fd in pending.fds:
            os.close(fd)
        pending.fds = []
        self.sel.unregister(pending.conn)
        pending.conn.close()

    @staticmethod
    def _reply(conn: socket.socket, body: dict) -> None:
        try:
            conn.send(json.dumps(body).encode() + b"\n")
        except OSError:
            pass  # the service went away; nobody to tell

    # -- runs ------------------------------------------------------------------------------

    def _start(self, conn: socket.socket, header: dict, fds: list[int]) -> None:
        req_fd, stdin_fd, out_fd, err_fd, result_fd = fds
        kernel = header.get("op") == "kernel"
        refused = None
        if kernel and header.get("uid") not in self.free_uids:
            refused = f"uid {header.get('uid')!r} is not free in this template"
        elif self.cfg.uid_base and not self.free_uids:
            refused = "no free run slot in this template"
        if refused:
            for fd in fds:
                os.close(fd)
            self._reply(conn, {"error": refused})
            conn.close()
            return
        if kernel:
            uid = int(header["uid"])
            self.free_uids.remove(uid)
        else:
            uid = self.free_uids.pop() if self.cfg.uid_base else None
        timeout = float(header.get("timeout") or 10.0)
        memory = int(header["memory"]) if header.get("memory") else None
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{N_FDS}i", *fds))]
        while True:
            if not self.idle:
                self._spawn_idle(1)
            idle = self.idle.pop()
            workdir = idle.workdir or os.path.join(self.cfg.runs_dir, f"tmp{_random_name()}")
            work = {"uid": uid, "workdir": workdir, "memory": memory, "kernel": kernel}
            work = json.dumps(work).encode()
            try:
                idle.chan.sendmsg([work], rights)
                break
            except OSError:
                self._discard_idle(idle)  # that child is gone; take another
            finally:
                idle.chan.close()
        started = time.monotonic()
        for fd in (stdin_fd, out_fd, err_fd):
            os.close(fd)  # the child's now: EOF reaches the service when the run ends
        run = Run(conn, idle.pid, uid, workdir, started, started + timeout, req_fd, result_fd)
        run.fetch, run.init, run.kernel = bool(header.get("fetch")), idle.init, kernel
        self.runs[run.pid] = run
        # Readable from now on means the service hung up (the run is cancelled), or, for a
        # kernel, asks for an interrupt.
        self.sel.register(conn, selectors.EVENT_READ, run)

    # -- pre-forked children -------------------------------------------------------------

    def _spawn_idle(self, n: int) -> None:
        """Fork `n` children that wait for a run. Forked back to back, in a batch: after a
        fork every page the template writes is copied (children share them), so the
        bookkeeping between forks is paid once per batch instead of once per run."""
        sys.stdout.flush()
        sys.stderr.flush()
        for _ in range(n):
            chan, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            idle = Idle(0, chan)
            if self.cfg.isolate:
                idle.workdir = os.path.join(self.cfg.runs_dir, f"tmp{_random_name()}")
                make_scratch(scratch_for(idle.workdir), self.cfg.tmp_bytes)
                idle.init, idle.pid = fork_in_new_pid_namespace(self.pid_ns)
            else:
                idle.pid = os.fork()
            if idle.pid == 0:
                try:
                    self._idle_child(theirs, idle.workdir)
                finally:
                    os._exit(SETUP_FAILED)
            theirs.close()
            self.idle.append(idle)

    @staticmethod
    def _discard_idle(idle: Idle) -> None:
        # Its init lives until we kill it (nothing else can), so its pid is still its own;
        # killing it takes the child with it.
        if idle.init is not None:
            os.kill(idle.init, signal.SIGKILL)
        if idle.workdir is not None:
            remove_tree(idle.workdir)
            drop_scratch(scratch_for(idle.workdir))

    def _idle_child(self, chan: socket.socket, workdir: str | None = None) -> None:
        """In a pre-forked child: wait for a run, then become it. With --isolate, first make
        its working directory and isolate it (paid ahead of demand, as the fork)."""
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != (0 if workdir else self.me):  # 0: our parent is outside our PID ns
            os._exit(0)
        _reset_signals()
        _close_fds_except(chan.fileno())  # nothing of other runs, the listener, the selector
        if workdir is not None:
            os.mkdir(workdir, 0o700)
            isolate_run(workdir, self.cfg)
        data, ancdata, _flags, _addr = chan.recvmsg(4096, socket.CMSG_SPACE(N_FDS * 4))
        fds = _received_fds(ancdata)
        if not data or len(fds) != N_FDS:
            os._exit(0)  # the template went away, or sent nonsense
        work = json.loads(data)
        if work.get("kernel"):
            kernel_child_main(self.cfg, work["uid"], work["workdir"], fds)
        child_main(self.cfg, work["uid"], work["workdir"], fds, work["memory"])

    def _cancelled(self, run: Run) -> None:
        try:
            data = run.conn.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:  # an interrupt for a kernel; other bytes mean nothing
            if run.kernel and b"I" in data and run.status is None:
                with acting_as(run.uid), contextlib.suppress(ProcessLookupError):
                    os.killpg(run.pid, signal.SIGINT)
            return
        # The service's side is closed: the run ends now. The connection stays for the
        # reply (a service that only shut its side down learns when all is swept).
        self.sel.unregister(run.conn)
        run.hung_up = True
        self._kill_group(run.pid, run.uid)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for run in self.runs.values():
            if run.status is None and not run.timed_out and now >= run.deadline:
                run.timed_out = True
                self._kill_group(run.pid, run.uid)
        for pid, run in list(self.helpers.items()):
            if now >= run.helper_deadline:
                self._kill_group(pid, run.uid)

    @staticmethod
    def _kill_group(pid: int, uid: int | None) -> None:
        """Kill a run's (or helper's) process group, and the process itself, in case it has
        not made its own group yet: as the template while it may still be the template's
        uid (setting up), as the run's uid once it has dropped to it."""
        for as_uid in dict.fromkeys([None, uid]):
            with acting_as(as_uid):
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.runs:
                run = self.runs[pid]
                if run.status is None:
                    run.status = status
                    run.elapsed = time.monotonic() - run.started
                    self._run_ended(run)
            elif pid in self.helpers:
                self._finish(self.helpers.pop(pid))
            # else: an orphan a run left behind, now gone

    def _run_ended(self, run: Run) -> None:
        self._kill_group(run.pid, run.uid)
        if run.init is not None:  # and with its PID 1, whatever the run left in its namespace
            os.kill(run.init, signal.SIGKILL)
        else:
            self._sweep_processes(run)
        setup_failed = os.waitstatus_to_exitcode(run.status or 0) == SETUP_FAILED
        if run.fetch and not setup_failed and not run.hung_up:
            pid = os.fork()
            if pid == 0:
                helper_main(run, self.cfg)
            run.helper = pid
            run.helper_deadline = time.monotonic() + 30.0
            self.helpers[pid] = run
        else:
            self._finish(run)

    def _finish(self, run: Run) -> None:
        if run.helper is not None:
            self._kill_group(run.helper, run.uid)
        self._remove_files(run)
        code = os.waitstatus_to_exitcode(run.status or 0)
        self._reply(
            run.conn,
            {
                "exit": None if run.timed_out else code,
                "signal": -code if code < 0 else None,
                "timeout": run.timed_out,
                "elapsed": round(run.elapsed, 6),
            },
        )
        if not run.hung_up:
            self.sel.unregister(run.conn)
        run.conn.close()
        os.close(run.req_fd)
        os.close(run.result_fd)
        self.runs.pop(run.pid, None)
        if run.uid is not None:
            self.free_uids.append(run.uid)

    # -- what a run leaves behind ----------------------------------------------------------

    def _children(self) -> list[int]:
        try:
            with open(f"/proc/self/task/{self.me}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            pass
        return [pid for pid in _processes() if _stat_field(pid, 1) == self.me]

    def _left_by(self, pid: int, run: Run, sessions: set[int]) -> bool:
        """Whether `pid`, no live run or helper, is a live process that belongs to `run`."""
        if run.uid is not None:
            return _real_uid(pid) == run.uid
        # Same user on the local backend: a process is this run's if it is in its session,
        # or in no live run's session (it escaped with setsid, or its run is over).
        sid = _stat_field(pid, 4)
        return sid is not None and (sid == run.pid or sid not in sessions)

    def _sweep_processes(self, run: Run) -> None:
        """Kill what the run left running. Orphans of a run become our children (subreaper);
        killing one orphans its own children to us, so repeat until none is left. Without a
        subreaper (gVisor) they become PID 1's: found by the run's uid among all processes,
        and reaped by PID 1 (tini)."""
        for _ in range(100):
            live = {r.pid for r in self.runs.values() if r.status is None}
            live |= set(self.helpers) | {idle.pid for idle in self.idle}
            candidates = self._children() if self.cfg.subreaper else _processes()
            victims = [p for p in candidates if p not in live and self._left_by(p, run, live)]
            if not victims:
                return
            with acting_as(run.uid):
                for pid in victims:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            for pid in victims:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:  # not ours: wait until PID 1 has it
                    _wait_gone(pid, time.monotonic() + 1.0)
        _log(f"run {run.pid}: processes still left after 100 sweeps")

    def _remove_files(self, run: Run) -> None:
        remove_tree(run.workdir)
        if self.cfg.isolate:
            drop_scratch(scratch_for(run.workdir))
        if run.uid is None:
            return
        # Shared writable directories (/tmp, /dev/shm): whatever this uid made there goes.
        for directory in self.cfg.sweep_dirs:
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.stat(follow_symlinks=False).st_uid == run.uid:
                        remove_tree(entry.path)
                except OSError:
                    continue

    def _shutdown(self) -> None:
        for idle in self.idle:
            idle.chan.close()  # an idle child reads EOF and exits
        for run in list(self.runs.values()):
            self._kill_group(run.pid, run.uid)
            self._sweep_processes(run)
            self._remove_files(run)
        for pid, run in list(self.helpers.items()):
            self._kill_group(pid, run.uid)
        for pid in self._children():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# -- start-up ----------------------------------------------------------------------------------


def preload(modules: list[str]) -> None:
    for name in modules:
        try:
            __import__(name)
        except Exception as exc:  # a missing optional package must not stop the template
            _log(f"could not preload {name}: {exc.__class__.__name__}: {exc}")
    if "matplotlib" in sys.modules:
        # Build the font list now, once, rather than in every child that plots.
        try:
            import matplotlib.font_manager  # noqa: F401
        except Exception:
            pass


def probe(run_as: str, cfg: Config) -> dict:
    """--probe: how far the machine lets isolation go (the local backend asks once at start-up,
    in a sandbox like a template's): the template's own namespaces, then one child isolated
    as a run would be, reporting what it sees."""
    report: dict = {"template": False, "runs": False}
    try:
        isolated_template(run_as)
        report["template"] = True
        workdir = os.path.join(cfg.runs_dir, "probe")
        os.mkdir(workdir, 0o700)
        make_scratch(scratch_for(workdir), 1024**2)
        facts_r, facts_w = os.pipe()
        own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        init, pid = fork_in_new_pid_namespace(own_pid_ns)
        if pid == 0:
            try:
                isolate_run(workdir, cfg)
                with open("/proc/self/status") as f:
                    status = dict(line.split(":", 1) for line in f)
                with open("/proc/net/dev") as f:
                    interfaces = [line.split(":")[0].strip() for line in f if ":" in line]
                facts = {
                    "runs": True,
                    "run_uid": os.getuid(),
                    "run_cap_eff": int(status["CapEff"], 16),
                    "run_pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                    "run_interfaces": interfaces,
                }
            except BaseException as exc:
                facts = {"error": f"a run could not be isolated: {exc}"}
            os.write(facts_w, json.dumps(facts).encode())
            os._exit(0)
        os.close(facts_w)
        os.waitpid(pid, 0)
        os.kill(init, signal.SIGKILL)
        report.update(json.loads(_read_pipe(facts_r) or b"{}"))
    except OSError as exc:
        report["error"] = str(exc)
    return report


def _read_pipe(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--runs", required=True)
    parser.add_argument("--uid-base", type=int, default=0)
    parser.add_argument("--isolate", action="store_true", help="namespaces per run")
    parser.add_argument("--tmp-bytes", type=int, default=64 * 1024**2, help="of each run's /tmp")
    parser.add_argument("--probe", action="store_true", help="report what isolation works")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--prefork", type=int, default=8)
    parser.add_argument("--kernels", default="", help="also fork kernels working under DIR")
    args = parser.parse_args(argv)
    if args.kernels and not args.uid_base:
        parser.error("--kernels needs --uid-base: each kernel has a uid of its own")

    pop = os.environ.pop
    run_as = pop("KERNELBOX_RUN_AS", "")
    if args.probe:
        cfg = Config(args.runs, None, 1, {}, None, 0, 0, [], 0, True, os.path.dirname(args.socket))
        print(json.dumps(probe(run_as, cfg)), flush=True)
        return
    if args.isolate:
        isolated_template(run_as)  # from here on, in the template proper
    elif run_as:  # a root service's sandbox where runs cannot have namespaces of their own
        from kernel_boot import enter_sandbox

        enter_sandbox(run_as)
    mpl_cache = pop("KERNELBOX_MPL_CACHE", "")
    if mpl_cache:
        seed_matplotlib_cache(mpl_cache)
    rlimits = json.loads(pop("KERNELBOX_RLIMITS", "") or "{}")
    nproc = int(pop("KERNELBOX_NPROC", "") or 0) or None
    nice = int(pop("KERNELBOX_NICE", "") or 0)
    want_netns = pop("KERNELBOX_UNSHARE_NET", "") == "1"
    huge = pop("KERNELBOX_HUGEPAGES", "") == "1"
    modules = [m for m in pop("KERNELBOX_PRELOAD", "").split(",") if m.strip()]
    sweep = [d for d in pop("KERNELBOX_SWEEP", "").split(":") if d]
    fetch_cap = int(pop("KERNELBOX_FETCH_CAP", "") or 64 * 1024**2)
    parent = pop("KERNELBOX_PARENT_PID", "")
    if parent:  # local backend: a service killed with SIGKILL cannot stop us; we stop
        from kernel_boot import die_with_parent

        die_with_parent(int(parent))
    if want_netns:
        unshare_network()
    try:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        subreaper = True
    except OSError as exc:
        if not args.uid_base:
            raise  # without uids of their own, a run's orphans are known only as children
        _log(f"no child subreaper ({exc}): processes left by a run are found by its uid")
        subreaper = False

    if args.kernels:
        from kernel_boot import KERNEL_PRELOAD, configure_app

        modules += [m for m in KERNEL_PRELOAD if m not in modules]
    preload([m.strip() for m in modules])
    if args.kernels:
        configure_app(["-f", KERNEL_CONNECTION_FILE])  # every kernel's command line
    # Our environment becomes the children's: without what only the interpreter's start
    # needed (the KERNELBOX_ variables are gone already).
    for name in ("PYTHONMALLOC", "GLIBC_TUNABLES"):
        os.environ.pop(name, None)
    sys.stdout.flush()
    _fresh_stdio()
    # Everything imported so far lives as long as the template: keep the collector away from
    # it (in every child too), so a child's first collection does not copy the whole heap.
    gc.collect()
    gc.freeze()
    gc.disable()
    if huge:
        collapsed, refused = collapse_to_huge_pages()
        _log(f"{collapsed >> 20} MiB on huge pages" + (f"; refused: {refused}" if refused else ""))

    os.makedirs(args.runs, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The directory holding the socket is what keeps runs away from it: the service's 0700
    # runtime directory, which a Docker template (no CAP_DAC_OVERRIDE) enters as its owner,
    # so the socket is the service's own too.
    owner = os.stat(os.path.dirname(args.socket) or ".").st_uid if args.uid_base else None
    with acting_as(owner):
        try:
            os.unlink(args.socket)
        except FileNotFoundError:
            pass
        # Made 0600 by the umask, not a chmod after: gVisor refuses to chmod a socket it
        # creates on the host (--host-uds=create).
        umask = os.umask(0o177)
        try:
            listener.bind(args.socket)
        finally:
            os.umask(umask)
    listener.listen(1024)
    listener.setblocking(False)
    uid_base = fit_uid_range(args.uid_base, args.slots) if args.uid_base else None
    cfg = Config(
        runs_dir=args.runs,
        uid_base=uid_base,
        slots=args.slots,
        rlimits=rlimits,
        nproc=nproc,
        nice=nice,
        prefork=args.prefork,
        sweep_dirs=sweep,
        fetch_cap=fetch_cap,
        isolate=args.isolate,
        hide_dir=os.path.dirname(args.socket),
        tmp_bytes=args.tmp_bytes,
        subreaper=subreaper,
        kernel_root=os.path.normpath(args.kernels) if args.kernels else "",
    )
    _log(f"ready: {len(modules)} modules preloaded, serving {args.socket}")
    Template(cfg, listener).serve()


if __name__ == "__main__":
    main(sys.argv[1:])
