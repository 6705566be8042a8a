"""The local backend's sandbox: bubblewrap (`bwrap`) command lines, and what this machine allows.

Every local kernel, and every fork-server template, runs in a bwrap sandbox of its own:
PID, mount, IPC, UTS, cgroup and network namespaces (no interface is up: no network, not even
the host's loopback); a read-only view of the system (/usr, a short list of /etc entries,
synthetic /etc/passwd and /etc/group) and of the kernel interpreter's prefixes at their own
paths; a fresh /proc of its own PID namespace; private size-limited tmpfs mounts on /tmp,
/dev/shm and /run/kernelbox (the runtime directory: the kernel's sockets, and its connection
file, which never touches the host's disk); the boot scripts and matplotlib's prebuilt font
cache read-only under /opt/kernelbox; and, for a kernel, the session's working directory at
/home/sandbox/work, the one host directory it can write. Everything else is read-only. The
service reaches the sockets through /proc/PID/root of the sandbox's PID 1 (`host_path`).

Two modes, chosen by who the service is:
- root: bwrap runs as root *without* a user namespace (with one, other uids would be unmapped
  and setgroups denied), left with CAP_SETUID and CAP_SETGID only; the boot script becomes the
  session's own uid and gid first thing (`SandboxUids`), enters a user namespace of its own
  and drops every capability. (Running bwrap as that uid instead cannot work: it could not
  reach bind sources such as pyenv's Python under /root, 0700.) A fork-server template also
  keeps CAP_SYS_ADMIN until it has become its uid, to take away bwrap's covers over /proc,
  which would forbid the fresh /proc each run mounts (see forkserver_boot.isolated_template).
- any other user: bwrap's unprivileged mode (`--unshare-user`, the uid maps to itself). The
  kernels have the service's uid, but in user and PID namespaces of their own they can
  neither see nor signal the service or each other, and process limits count per namespace.

bwrap keeps its PID 1 (a reaper) and dies with the service (`--die-with-parent`): killing
that PID 1 kills every process of the sandbox, setsid'ed and double-forked ones included;
`--new-session` makes it a session leader, so signalling its process group reaches the kernel
and everything the kernel started (SIGINT for an interrupt; PID 1 itself ignores it).
"""

from __future__ import annotations

import asyncio
import glob
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .base import SANDBOX_RUNTIME, SANDBOX_WORKDIR

log = logging.getLogger(__name__)

#: where the boot scripts (read-only) and matplotlib's prebuilt font cache are, inside
BOOT_DIR = "/opt/kernelbox"
MPL_CACHE = f"{BOOT_DIR}/matplotlib"
BOOT_SOURCES = Path(__file__).resolve().parent.parent  # kernel_boot.py, forkserver_boot.py
BOOT_FILES = ("kernel_boot.py", "forkserver_boot.py", "kernel_template_boot.py")
# The /etc entries a Python with the data stack reads (the loader's cache, name service
# switch, time zone, certificates, fonts, Debian's alternatives, MIME types, ...), where they
# exist. The host's others (shadow, the service's own configuration) stay out.
ETC_ENTRIES = (
    "alternatives",
    "ca-certificates",
    "crypto-policies",
    "debian_version",
    "fonts",
    "gai.conf",
    "host.conf",
    "hosts",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "matplotlibrc",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "pki",
    "protocols",
    "services",
    "ssl",
    "timezone",
)
# Top-level directories that a merged-/usr system makes symlinks into /usr.
USR_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
KERNEL_CAPS = ("CAP_SETUID", "CAP_SETGID")  # root mode: to become the session's uid
TEMPLATE_CAPS = (*KERNEL_CAPS, "CAP_SYS_ADMIN")  # ... and first remove the /proc covers
TMP_BYTES = 256 * 1024**2  # /tmp (a fork-server template's holds its runs' directories)
SHM_BYTES = 64 * 1024**2  # /dev/shm, as Docker's default
RUNTIME_BYTES = 1024**2  # /run/kernelbox: sockets take no room


def host_path(init_pid: int, inside: str) -> Path:
    """A path of the sandbox whose PID 1 is `init_pid`, as the service opens it."""
    return Path(f"/proc/{init_pid}/root{inside}")


# -- uids of a root service's sandboxes -------------------------------------------------------


class SandboxUids:
    """A root service's sandboxes each get a uid (and a gid of the same number) of their own:
    one per working directory for as long as the directory exists, so a restarted kernel
    finds its files its own; one per fork-server template (its runtime directory). Taken from
    a block of 65536 chosen at random in [1.1e9, 2.08e9): above the Docker fork server's
    per-run uids (10**6 + n * 1024 + slot, below 1.025e9), below 2**31."""

    FIRST, BLOCK, BLOCKS = 1_100_000_000, 65_536, 15_000

    def __init__(self) -> None:
        self.base = self.FIRST + secrets.randbelow(self.BLOCKS) * self.BLOCK
        self._owners: dict[str, int] = {}

    def take(self, owner: Path) -> int:
        key = str(owner)
        if key in self._owners:
            return self._owners[key]
        # A directory that is gone took its files with it: its uid may serve again.
        for gone in [k for k in self._owners if not os.path.lexists(k)]:
            del self._owners[gone]
        used = set(self._owners.values())
        uid = next((u for u in range(self.base, self.base + self.BLOCK) if u not in used), None)
        if uid is None:
            raise RuntimeError(f"all {self.BLOCK} sandbox uids are in use")
        self._owners[key] = uid
        return uid


# -- the interpreter --------------------------------------------------------------------------

_PREFIXES = (
    "import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, "
    "sys.base_exec_prefix]))"
)
_interpreters: dict[str, tuple[str, ...]] = {}


def _outermost(paths: list[str]) -> tuple[str, ...]:
    """The directories to bind: none inside another, none under /usr (bound whole)."""
    out: list[str] = []
    for path in sorted({os.path.normpath(p) for p in paths if p}):
        if path == "/usr" or path.startswith("/usr/"):
            continue
        if not any(path == o or path.startswith(o + "/") for o in out):
            out.append(path)
    return tuple(out)


def _interpreter_dirs(python: str, prefixes: list[str]) -> tuple[str, ...]:
    # The executable's own directory too, where it is not under one of its prefixes.
    exe = [os.path.dirname(os.path.abspath(python)), os.path.dirname(os.path.realpath(python))]
    return _outermost([*prefixes, *exe])


async def interpreter_paths(python: str) -> tuple[str, ...]:
    """What a sandbox binds read-only for `python`: its prefixes (a venv and the installation
    it is made from), found once by asking it. Not a repository an editable install points
    at: a missing entry on sys.path is harmless."""
    if python not in _interpreters:
        proc = await asyncio.create_subprocess_exec(
            python,
            "-I",
            "-c",
            _PREFIXES,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        if proc.returncode != 0:
            said = err.decode(errors="replace").strip()[-1000:]
            raise RuntimeError(f"{python} did not run (exit {proc.returncode}): {said}")
        _interpreters[python] = _interpreter_dirs(python, json.loads(out))
    return _interpreters[python]


def _own_interpreter_paths() -> tuple[str, ...]:
    prefixes = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    return _interpreter_dirs(sys.executable, prefixes)


# -- command lines ----------------------------------------------------------------------------


def data_fd(content: bytes) -> int:
    """A pipe holding `content`, for `--ro-bind-data`: the read end (close it after the start)."""
    if len(content) > 60_000:  # a pipe holds 64 KiB; more would block before bwrap reads
        raise ValueError("sandbox data files are small")
    read, write = os.pipe()
    try:
        os.write(write, content)
    finally:
        os.close(write)
    return read


def passwd_files(uid: int, gid: int) -> dict[str, bytes]:
    """/etc/passwd and /etc/group naming the sandbox's user, so `getpass.getuser()` and
    `~` work for a uid the host does not know; the host's users stay out."""
    home = SANDBOX_WORKDIR
    return {
        "/etc/passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"sandbox:x:{uid}:{gid}:kernelbox sandbox:{home}:/usr/sbin/nologin\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ).encode(),
        "/etc/group": f"root:x:0:\nsandbox:x:{gid}:\nnogroup:x:65534:\n".encode(),
    }


@dataclass(frozen=True)
class Bind:
    source: Path
    target: str
    writable: bool = False


@dataclass
class Bubblewrap:
    """bwrap command lines for the sandboxes of one backend."""

    path: str
    as_root: bool
    tmp_bytes: int = TMP_BYTES
    shm_bytes: int = SHM_BYTES

    def command(
        self,
        argv: list[str],
        *,
        python_paths: tuple[str, ...],
        cwd: str,
        binds: list[Bind] = (),  # type: ignore[assignment]
        data: dict[str, int] | None = None,
        info_fd: int | None = None,
        caps: tuple[str, ...] = KERNEL_CAPS,
    ) -> list[str]:
        """`argv` in a sandbox. `data` maps paths inside to fds from `data_fd`; `caps` are
        what a root service's sandbox keeps (without root, bwrap leaves none)."""
        args = [self.path, "--die-with-parent", "--new-session"]
        if info_fd is not None:
            args += ["--info-fd", str(info_fd)]
        args += ["--unshare-pid", "--unshare-ipc", "--unshare-net", "--unshare-uts"]
        args += ["--unshare-cgroup-try", "--hostname", "sandbox"]
        if self.as_root:
            args += ["--cap-drop", "ALL"]
            for cap in caps:
                args += ["--cap-add", cap]
        else:
            args += ["--unshare-user"]
        made: set[str] = {"/"}

        def directory(path: str) -> None:
            """`path` and its missing parents, 0755: bwrap would make parents with a mode
            another uid cannot traverse."""
            for each in [*reversed(Path(path).parents), Path(path)]:
                if str(each) not in made:
                    made.add(str(each))
                    args.extend(["--perms", "0755", "--dir", str(each)])

        def mounted(flag: str, source: str, target: str, *options: str) -> None:
            directory(str(Path(target).parent))
            made.add(target)
            args.extend([*options, flag, *([source] if source else []), target])

        mounted("--ro-bind", "/usr", "/usr")
        for name in USR_LINKS:
            host = f"/{name}"
            if os.path.islink(host):
                args += ["--symlink", os.readlink(host), host]
            elif os.path.isdir(host):
                mounted("--ro-bind", host, host)
        directory("/etc")
        for entry in [f"/etc/{e}" for e in ETC_ENTRIES] + sorted(glob.glob("/etc/python3*")):
            if os.path.exists(entry):
                mounted("--ro-bind", entry, entry)
        mounted("--proc", "", "/proc")
        mounted("--dev", "", "/dev")
        # /mnt and /data: scratch of the sandbox's own, as /tmp (SandboxFusion's code writes
        # there); a fork-server run gets its own over them (forkserver_boot.isolate_run).
        scratch = [(path, self.tmp_bytes) for path in ("/tmp", "/mnt", "/data")]
        for target, size in [*scratch, ("/dev/shm", self.shm_bytes)]:
            mounted("--tmpfs", "", target, "--perms", "1777", "--size", str(size))
        mounted("--tmpfs", "", SANDBOX_RUNTIME, "--perms", "1777", "--size", str(RUNTIME_BYTES))
        for path in python_paths:
            mounted("--ro-bind", path, path)
        for name in BOOT_FILES:
            mounted("--ro-bind", str(BOOT_SOURCES / name), f"{BOOT_DIR}/{name}")
        for bind in binds:
            mounted("--bind" if bind.writable else "--ro-bind", str(bind.source), bind.target)
        for target, fd in (data or {}).items():
            mounted("--ro-bind-data", str(fd), target, "--perms", "0444")
        # The root is bwrap's own tmpfs, and writable by the sandbox's uid without root.
        args += ["--remount-ro", "/", "--chdir", cwd, "--", *argv]
        return args


# -- what the machine allows ------------------------------------------------------------------

_PROBE_UID = SandboxUids.FIRST - 1  # below every sandbox's
_probes: dict[tuple[str, bool], dict] = {}


def probe(bwrap: str, as_root: bool) -> dict:
    """Start one sandbox as a fork-server template's is started (the strictest case), with
    the service's own interpreter, and ask forkserver_boot.py what it could do there: enter
    its own user namespace (`template`), and isolate a child as a run (`runs`, with what
    that child saw). `bwrap_error` says why no sandbox could be made. Cached per process."""
    key = (bwrap, as_root)
    if key in _probes:
        return _probes[key]
    sandbox = Bubblewrap(bwrap, as_root)
    uid = _PROBE_UID if as_root else os.getuid()
    fds = {path: data_fd(content) for path, content in passwd_files(uid, uid).items()}
    argv = [sys.executable, f"{BOOT_DIR}/forkserver_boot.py", "--probe"]
    argv += ["--socket", f"{SANDBOX_RUNTIME}/probe.sock", "--runs", "/tmp"]
    command = sandbox.command(
        argv, python_paths=_own_interpreter_paths(), cwd="/tmp", data=fds, caps=TEMPLATE_CAPS
    )
    env = {"PATH": "/usr/bin:/bin", "KERNELBOX_RUN_AS": f"{uid}:{uid}" if as_root else ""}
    try:
        done = subprocess.run(
            command, env=env, pass_fds=list(fds.values()), capture_output=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        result = {"bwrap_error": f"bwrap did not run: {exc}"}
    else:
        lines = done.stdout.decode(errors="replace").strip().splitlines()
        try:
            result = json.loads(lines[-1])
        except (IndexError, ValueError):
            said = done.stderr.decode(errors="replace").strip()[-500:]
            result = {"bwrap_error": f"bwrap failed (exit {done.returncode}): {said}"}
    finally:
        for fd in fds.values():
            os.close(fd)
    if result.get("runs") and (result.get("run_cap_eff") != 0 or len(result["run_pids"]) > 2):
        result.update(runs=False, error=f"an isolated run still saw too much: {result}")
    _probes[key] = result
    return result


def isolation_report(choice: str, bwrap: str | None, as_root: bool) -> tuple[dict, bool, bool]:
    """What the local backend can isolate here, given `choice` (the `local_sandbox` setting:
    auto, bwrap or none). Returns the report that `/readyz` shows, whether kernels run in
    bwrap sandboxes, and whether each fork-server run gets namespaces of its own. Raises
    when `choice` is bwrap and no sandbox can be made."""
    missing: list[str] = []
    found: dict = {}
    if choice == "none":
        missing.append("the bwrap sandbox is switched off (KERNELBOX_LOCAL_SANDBOX=none)")
    elif bwrap is None:
        missing.append("bubblewrap is not installed (apt-get install bubblewrap)")
    else:
        found = probe(bwrap, as_root)
    sandboxed = bool(found) and "bwrap_error" not in found
    runs_isolated = sandboxed and bool(found.get("runs"))
    if found and not sandboxed:
        missing.append(f"no sandbox: {found['bwrap_error']}")
    elif sandboxed and not runs_isolated:
        missing.append(
            "/run_code runs share their template's sandbox, without namespaces of their own: "
            f"{found.get('error', 'unknown reason')}"
        )
    if choice == "bwrap" and not sandboxed:
        raise RuntimeError(f"KERNELBOX_LOCAL_SANDBOX=bwrap, but {'; '.join(missing)}")
    namespaces = ["pid", "mount", "ipc", "uts", "network", "cgroup"]
    if sandboxed and found.get("template"):  # without it (root, no user namespaces): uids only
        namespaces.insert(0, "user")
    kernels = {
        "sandbox": "bwrap" if sandboxed else "none",
        "user": (
            ("a uid of its own per session" if as_root else "the service's uid")
            if sandboxed
            else "the service's own"
        ),
        "namespaces": namespaces if sandboxed else ["network"],
        "read_only_system": sandboxed,
        "writable": (
            [SANDBOX_WORKDIR, "/tmp", "/dev/shm", SANDBOX_RUNTIME]
            if sandboxed
            else ["whatever the service's user may write"]
        ),
    }
    run_code = (
        "namespaces of its own per run (user, pid, mount, ipc, network)"
        if runs_isolated
        else "forks sharing their template's sandbox"
        if sandboxed
        else "forks of a template, as the service's user"
    )
    report = {
        "backend": "local",
        "kernels": kernels,
        "run_code": run_code,
        "weak": bool(missing),
        "missing": missing,
    }
    return report, sandboxed, runs_isolated


def find_bwrap() -> str | None:
    return shutil.which("bwrap")
