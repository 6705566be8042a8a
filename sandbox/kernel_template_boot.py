"""Kernel template: runs *inside* a bwrap sandbox and forks one full kernel per request.

Standalone on purpose (stdlib + kernel_boot.py next to it), like forkserver_boot.py. Usage:

    python kernel_template_boot.py --socket PATH

The template imports what a kernel needs (ipykernel, IPython, zmq, tornado, the data stack)
but starts no thread, zmq context or event loop, so a fork of it is a clean process; it
freezes its heap for the GC (a child's collections never write the template's pages), then
serves fork requests on a SOCK_SEQPACKET unix socket that only the service reaches (through
/proc/PID/root of the sandbox). It stays root with CAP_SETUID, CAP_SETGID and CAP_SYS_ADMIN
(a root service's sandbox): it runs no code of anyone's, and a child needs them to build its
sandbox before dropping them.

One connection per kernel:

    service -> template   JSON {"op": "fork", "tmp_bytes": n, "shm_bytes": n,
                          "runtime_bytes": n} with SCM_RIGHTS [request, workdir, output]:
                          a memfd holding the request JSON {"argv", "env", "files", "run_as"},
                          a detached mount of the session's working directory
                          (open_tree(OPEN_TREE_CLONE), made by the service), and the write end
                          of the pipe for what the kernel prints outside the protocol.
    child -> service      "P" as soon as it exists (the service reads its host pid from the
                          packet's SCM_CREDENTIALS); then "E<reason>" if its set-up failed, or
                          "X<wait status>" when the kernel has ended. EOF without either: it
                          was killed.

The template never reads a request (the child does), so its memory, which every later kernel
inherits, holds nothing of any session. Per kernel, the child (PID 1 of a fresh PID namespace,
the namespace's reaper) makes a mount namespace: a /proc of its own PID namespace; fresh /tmp,
/mnt, /data, /dev/shm (what the template had mounted inside them, such as a Python environment
under /tmp, bound back read-only) and /run/kernelbox (sockets, connection file); /etc/passwd and
/etc/group naming the session's uid; the working directory at /home/sandbox/work; and a fresh
IPC namespace. It then forks the kernel (PID 2), drops to the session's uid itself and waits.
The kernel calls kernel_boot.harden() (the session's uid, a user namespace of its own with no
capability, a network namespace with only loopback, rlimits, niceness) and run_kernel(), as a
spawned kernel does.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import signal
import socket
import struct
import sys

from kernel_boot import KERNEL_PRELOAD, become, check_libc, configure_app, harden, run_kernel

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
MOVE_MOUNT_F_EMPTY_PATH = 0x4
SYS_MOVE_MOUNT = 429  # the same number on x86_64 and aarch64 (the unified table)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4
AT_FDCWD = -100
N_FDS = 3  # request, workdir, output
SANDBOX_WORKDIR = "/home/sandbox/work"
SANDBOX_RUNTIME = "/run/kernelbox"
SCRATCH = ("/tmp", "/mnt", "/data")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.syscall.restype = ctypes.c_long
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _log(message: str) -> None:
    print(f"kernelbox-kernel-template: {message}", file=sys.stderr, flush=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    encode = lambda v: v.encode() if v else None  # noqa: E731
    check_libc(
        _libc.mount(encode(source), target.encode(), encode(fstype), flags, encode(data)),
        f"mount {source} on {target}" + (f" ({data})" if data else ""),
    )


def _prctl(option: int, value: int) -> None:
    check_libc(_libc.prctl(option, value, 0, 0, 0), f"prctl({option})")


def _read_all(fd: int) -> bytes:
    chunks = []
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_file(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def preload() -> None:
    for name in KERNEL_PRELOAD:
        try:
            __import__(name)
        except Exception as exc:  # an optional package missing must not stop the template
            _log(f"could not preload {name}: {exc.__class__.__name__}: {exc}")
    import matplotlib.font_manager  # noqa: F401  the font list, built once here


def threads() -> int:
    """Threads of this process, C libraries' included (a fork keeps only the caller's)."""
    return len(os.listdir("/proc/self/task"))


# -- the child: PID 1 of the kernel's namespace -------------------------------------------------


def _mounts_below(paths: tuple[str, ...]) -> list[tuple[str, int]]:
    """The template's mounts inside the scratch directories (the Python environment, when it
    lives under /tmp or /data, bound there as bwrap binds it for a spawned kernel), each with
    an O_PATH handle on it: the fresh tmpfs mounted over them next would hide them."""
    with open("/proc/self/mountinfo") as f:
        # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
        points = [
            line.split()[4].encode().decode("unicode_escape").encode("latin-1").decode()
            for line in f
        ]
    below = sorted({p for p in points if any(p.startswith(d + "/") for d in paths)}, key=len)
    outermost: list[str] = []
    for point in below:  # the nested ones come along with their parent (MS_REC)
        if not any(point.startswith(parent + "/") for parent in outermost):
            outermost.append(point)
    return [(point, os.open(point, os.O_PATH | os.O_NOFOLLOW)) for point in outermost]


def _restore_mounts(kept: list[tuple[str, int]]) -> None:
    """Bind what `_mounts_below` found back at its place on the fresh tmpfs, read-only."""
    for point, handle in kept:
        if os.path.isdir(f"/proc/self/fd/{handle}"):
            os.makedirs(point, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(point), mode=0o755, exist_ok=True)
            os.close(os.open(point, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o444))
        _mount(f"/proc/self/fd/{handle}", point, None, MS_BIND | MS_REC)
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
        _mount(None, point, None, flags)
        os.close(handle)


def build_sandbox(header: dict, request: dict, workdir_fd: int) -> None:
    """As root, in a fresh mount namespace: what a bwrap sandbox of its own would give the
    kernel (see the module's docstring)."""
    check_libc(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare(CLONE_NEWNS|CLONE_NEWIPC)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    kept = _mounts_below((*SCRATCH, "/dev/shm"))
    for path in SCRATCH:
        _mount(
            "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={header['tmp_bytes']}"
        )
    _mount(
        "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={header['shm_bytes']}"
    )
    _restore_mounts(kept)
    runtime = f"mode=1777,size={header['runtime_bytes']}"
    _mount("tmpfs", SANDBOX_RUNTIME, "tmpfs", MS_NOSUID | MS_NODEV, runtime)
    for target, text in request["files"].items():
        if target.startswith(SANDBOX_RUNTIME + "/"):
            _write_file(target, text.encode(), 0o444)
        else:  # /etc/passwd, /etc/group: over the template's, read-only
            staged = f"{SANDBOX_RUNTIME}/.{os.path.basename(target)}"
            _write_file(staged, text.encode(), 0o444)
            # The template's copy is bwrap's --ro-bind-data of a file since unlinked, onto
            # which nothing can be mounted: the placeholder under it can.
            _libc.umount2(target.encode(), MNT_DETACH)
            _mount(staged, target, None, MS_BIND)
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
            _mount(None, target, None, flags, "remount")
            os.unlink(staged)
    moved = _libc.syscall(
        SYS_MOVE_MOUNT, workdir_fd, b"", AT_FDCWD, SANDBOX_WORKDIR.encode(), MOVE_MOUNT_F_EMPTY_PATH
    )
    check_libc(0 if moved == 0 else -1, "move_mount(working directory)")


def kernel_main(request: dict, out_fd: int) -> None:
    """PID 2: the kernel. Never returns."""
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.environ.clear()
        os.environ.update(request["env"])
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.closerange(3, 1 << 20)
        os.chdir(SANDBOX_WORKDIR)
        os.makedirs(os.environ.get("MPLCONFIGDIR", "/tmp/matplotlib"), exist_ok=True)
        _reseed_numpy()
        caps = harden()
    except BaseException as exc:
        print(f"kernelbox-kernel-template: kernel set-up failed: {exc!r}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(255)
    try:
        run_kernel(request["argv"], caps)
    except SystemExit as exc:
        sys.stdout.flush()
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _reseed_numpy() -> None:
    """Python's `random` reseeds itself in a forked child; numpy's global state does not, and
    every kernel would draw the same numbers."""
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()


def init_main(conn: socket.socket, header: dict, fds: list[int]) -> None:
    """PID 1 of the kernel's PID namespace, forked by the template; never returns."""
    request_fd, workdir_fd, out_fd = fds
    try:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.setsid()  # the kernel's process group is ours: an interrupt reaches all it started
        conn.send(b"P")
        request = json.loads(_read_all(request_fd))
        os.close(request_fd)
        build_sandbox(header, request, workdir_fd)
        os.close(workdir_fd)
        kernel = os.fork()
        if kernel == 0:
            conn.close()
            kernel_main(request, out_fd)
        os.close(out_fd)
        os.closerange(3, conn.fileno())
        os.closerange(conn.fileno() + 1, 1 << 20)
        # What stays PID 1 holds nothing: the session's uid, no capability, not traceable;
        # and it ignores what an interrupt sends its group.
        if request.get("run_as"):
            become(*(int(part) for part in request["run_as"].split(":")))
        _prctl(PR_SET_DUMPABLE, 0)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_IGN)
    except BaseException as exc:
        try:
            conn.send(f"E{exc.__class__.__name__}: {exc}".encode()[:60000])
        finally:
            os._exit(255)
    while True:  # reap every orphan of the namespace until the kernel itself ends
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(1)
        except InterruptedError:
            continue
        if pid == kernel:
            try:
                conn.send(b"X%d" % status)
            finally:
                os._exit(0)


# -- the template ------------------------------------------------------------------------------


def _reap(*_args) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(listener: socket.socket) -> None:
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, _reap)
    while True:
        conn, _ = listener.accept()
        fds: list[int] = []
        try:
            data, ancdata, _flags, _addr = conn.recvmsg(64 * 1024, socket.CMSG_SPACE(N_FDS * 4))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    n = len(payload) // 4
                    fds += list(struct.unpack(f"{n}i", payload[: n * 4]))
            header = json.loads(data)
            if header.get("op") != "fork" or len(fds) != N_FDS:
                conn.send(b"Ebad request")
                continue
            # The child is PID 1 of a fresh PID namespace; later forks go back to ours.
            check_libc(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
            try:
                pid = os.fork()
            except BaseException:
                check_libc(_libc.setns(own_pid_ns, CLONE_NEWPID), "setns(CLONE_NEWPID)")
                raise
            if pid == 0:
                listener.close()
                init_main(conn, header, fds)
            check_libc(_libc.setns(own_pid_ns, CLONE_NEWPID), "setns(CLONE_NEWPID)")
        except Exception as exc:
            _log(f"fork request failed: {exc.__class__.__name__}: {exc}")
            try:
                conn.send(f"E{exc.__class__.__name__}: {exc}".encode()[:60000])
            except OSError:
                pass
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    args = parser.parse_args(argv)
    cache = os.environ.pop("KERNELBOX_MPL_CACHE", "")
    if cache:
        from kernel_boot import seed_matplotlib_cache

        seed_matplotlib_cache(cache)
    preload()
    configure_app(["-f", f"{SANDBOX_RUNTIME}/connection.json"])  # every forked kernel's argv
    if threads() != 1:
        _log(f"{threads()} threads after the imports; a forked kernel keeps only one")
    gc.collect()
    gc.freeze()  # what the template holds is never scanned (and so never written) in a child
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(args.socket)
    os.chmod(args.socket, 0o600)
    listener.listen(128)
    _log("ready")
    serve(listener)


if __name__ == "__main__":
    main(sys.argv[1:])
