"""The Docker backend: one container per kernel, the production sandbox.

Each kernel runs in its own container of the kernel image (Dockerfile.kernel):

- no network at all (`network_mode="none"`); the engine reaches the kernel over ZMQ IPC,
  through unix sockets in a per-kernel runtime directory that is bind-mounted into that one
  container (at /run/kernelbox). The host keeps the host-side socket paths in
  `connection_info`; the connection file the kernel reads names the container-side paths
  (same ports, other `ip` prefix);
- the session working directory bind-mounted read-write at /home/sandbox/work (also its cwd
  and HOME); a read-only root; a size-limited tmpfs at /tmp;
- memory (no swap), CPU, pids, open-file and file-size limits; no capabilities,
  no-new-privileges, a non-root user; an environment built from nothing;
- tini as PID 1 (the image's entrypoint, run with `-g`), so a signal sent to the container
  reaches the kernel's whole process group: SIGINT interrupts the cell as Ctrl-C would;
- labels naming the service instance, the kernel and the owning process, so containers left
  by a service that died (SIGKILL, a crash, a reboot) are recognised and removed by the next
  backend that starts (see `DockerBackend.reap_orphans`).

Blocking docker-py calls run in the backend's own thread pool (never the event loop's default
one, which a slow Docker daemon would otherwise starve). Deaths are learnt from one Docker
event stream per backend rather than one blocking `wait` per container.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import psutil
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import LogConfig, Mount, Ulimit

from ..files import give_tree
from . import docker_runtime
from .base import (
    SANDBOX_RUNTIME,
    SANDBOX_WORKDIR,
    ExitInfo,
    KernelBackend,
    KernelConfig,
    KernelProcess,
    connection_info_at,
    new_connection_info,
    write_connection_file,
)
from .hostpath import HostPaths
from .local import BOOT_SCRIPT, boot_env, describe_exit, kernel_env, tree_pss

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "kernelbox-kernel:latest"
REAPER_SCRIPT = Path(__file__).with_name("docker_reaper.py")

# Paths inside the container (see Dockerfile.kernel).
CONTAINER_WORKDIR = SANDBOX_WORKDIR
CONTAINER_RUNTIME = SANDBOX_RUNTIME
CONTAINER_PATH = "/opt/venv/bin:/usr/local/bin:/usr/bin:/bin"
#: the image's non-root user
SANDBOX_UID_GID = (1000, 1000)

# Labels. Every container of ours carries INSTANCE; the others say who owns it.
LABEL_INSTANCE = "kernelbox.instance"  # uuid of the DockerBackend that made it
LABEL_KERNEL = "kernelbox.kernel"  # id of the kernel (also in the container name)
LABEL_PID = "kernelbox.pid"  # pid of the service process ...
LABEL_PID_START = "kernelbox.pid_start"  # ... and its start time (pids get reused)
LABEL_PIDNS = "kernelbox.pidns"  # the pid namespace those pids mean something in
LABEL_BOOT = "kernelbox.boot_id"  # the host boot the owner ran in
LABEL_LOCK = "kernelbox.lock"  # the owner's lock file, as the owner sees it (held while alive)
LABEL_CONTAINER = "kernelbox.container"  # the container the owner runs in, if any ...
LABEL_CONTAINER_START = "kernelbox.container_started"  # ... and when that one started
LABEL_CREATED = "kernelbox.created"  # unix time

# A unix socket path has room for 107 bytes. Ours, under the runtime root: a kernel's
# "k-xxxxxxxx/k-5" and a fork-server template's "f-xxxxxxxx/fs.sock" (the longer).
_SOCKET_PATH_MAX = 107
_LONGEST_SOCKET = "/f-xxxxxxxx/fs.sock"
_SOCKET_PORT_KEYS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id")


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _in_cgroup_of(pid: int, container_id: str) -> bool:
    """Whether process `pid`, as this process sees pids, runs in that container."""
    return container_id in _read(f"/proc/{pid}/cgroup")


def _process_start(pid: int) -> str:
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return ""


def our_containers_filter(instance: str | None = None, pid: int | None = None) -> dict:
    """Docker `filters` for containers of ours: all of them, one backend's, or one process's.

    With `pid`, only containers made in this host boot and pid namespace by that process.
    """
    labels = [f"{LABEL_INSTANCE}={instance}" if instance else LABEL_INSTANCE]
    if pid is not None:
        labels += [f"{LABEL_PID}={pid}", f"{LABEL_BOOT}={_boot_id()}", f"{LABEL_PIDNS}={_pid_ns()}"]
    return {"label": labels}


def _warn_if_stale(image: str, labels: dict[str, str]) -> None:
    """An image built from other boot files than this checkout's runs other code."""
    built = labels.get("kernelbox.boot.sha256")
    try:
        here = hashlib.sha256(
            BOOT_SCRIPT.read_bytes() + (BOOT_SCRIPT.parent / "forkserver_boot.py").read_bytes()
        ).hexdigest()
    except OSError:
        return  # installed without the source next to it
    if built and built != here:
        log.warning(
            "image %s was built from other sandbox/kernel_boot.py or forkserver_boot.py "
            "files than these; rebuild it with scripts/build-kernel-image.sh",
            image,
        )


def exit_info(code: int | None, oom: bool = False) -> ExitInfo:
    """How a container ended. tini exits with 128+N when the kernel was killed by signal N."""
    if oom:
        return ExitInfo(code, "out of memory", oom=True)
    if code is not None and 128 < code < 128 + 65:
        return describe_exit(128 - code)
    return describe_exit(code)


class DockerKernel(KernelProcess):
    """One kernel container. Created by `DockerBackend.start`."""

    def __init__(
        self,
        backend: DockerBackend,
        container: Any,
        kernel_id: str,
        workdir: Path,
        runtime_dir: Path,
        info: dict,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._backend = backend
        self.container = container
        self.container_id: str = container.id
        self.name: str = container.name
        self.kernel_id = kernel_id
        self.workdir = workdir
        self.runtime_dir = runtime_dir
        self.connection_info = info
        self.file_owner = backend.file_owner
        self._loop = loop
        self._death: asyncio.Future[ExitInfo] = loop.create_future()
        self._last_log = ""
        self._removed = False
        #: host pid of the container's PID 1 (tini), set once started
        self.host_pid: int | None = None
        self._sealer: asyncio.Task[None] | None = None

    # Called from the backend's event thread (any thread): resolve in the kernel's loop.
    def _died(self, info: ExitInfo, log_text: str) -> None:
        def resolve() -> None:
            if not self._death.done():
                self._last_log = log_text or self._last_log
                self._death.set_result(info)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(resolve)

    async def poll(self) -> ExitInfo | None:
        if self._death.done():
            return self._death.result()
        # The event stream is authoritative; asking the daemon covers a stream that broke.
        try:
            state = (await self._backend._call(self._inspect))["State"]
        except NotFound:
            return ExitInfo(None, "the container was removed")
        if state.get("Running") or state.get("Status") == "created":
            return None
        return exit_info(state.get("ExitCode"), bool(state.get("OOMKilled")))

    def _inspect(self) -> dict:
        return self._backend.client.api.inspect_container(self.container_id)

    async def wait(self) -> ExitInfo:
        # shield: the engine cancels its waiting task on shutdown; others may still wait.
        return await asyncio.shield(self._death)

    async def send_signal(self, signum: int) -> None:
        if self._death.done() or self._removed:
            return
        # To PID 1 (tini -g), which forwards it to the kernel's process group.
        try:
            await self._backend._call(self.container.kill, signal=int(signum))
        except (NotFound, APIError) as exc:  # 409: not running any more
            log.debug("signal %s to %s not delivered: %s", signum, self.name, exc)

    async def kill(self) -> None:
        if not self._removed:
            self._removed = True
            await self._backend._call(self._backend._remove, self.container_id)
        if not self._death.done():
            # Do not wait for the die event: the container is gone, and so is the kernel.
            self._death.set_result(exit_info(137))

    def _logs(self, max_chars: int) -> str:
        try:
            raw = self.container.logs(stdout=True, stderr=True, tail=200)
        except DockerException:
            return ""
        return raw.decode(errors="replace")[-max_chars:]

    async def cleanup(self) -> None:
        if self._sealer is not None:
            self._sealer.cancel()
        self._backend._forget(self)
        await self._backend._call(shutil.rmtree, self.runtime_dir, True)

    async def _seal_runtime_dir(self, timeout: float) -> None:
        """Once the kernel has bound its sockets, take its runtime directory back.

        Otherwise code in the kernel could swap a socket for a symlink to some other unix
        socket on the host, which the engine's ZMQ client would follow on its next
        reconnect. Bound sockets stay connectable; the kernel no longer needs the directory.
        Only possible when the kernel runs under another uid than the service (root service).
        """
        prefix = self.connection_info["ip"]
        paths = [Path(f"{prefix}-{self.connection_info[k]}") for k in _SOCKET_PORT_KEYS]
        deadline = self._loop.time() + timeout
        while not all(p.is_socket() for p in paths):
            if self._death.done() or self._loop.time() > deadline:
                return
            await asyncio.sleep(0.02)
        with contextlib.suppress(OSError):
            os.chown(self.runtime_dir, os.geteuid(), os.getegid())
            os.chmod(self.runtime_dir, 0o755)

    def memory_pss(self) -> int | None:
        """Proportional set size of everything in the container, from the host's /proc: tini
        and the kernel (runc); the Sentry, its stubs and its gofer (runsc: the whole sandbox,
        which is what it costs; gVisor keeps the code's memory in a file the Sentry maps)."""
        if self.host_pid is None:
            return None
        pids = [self.host_pid]
        with contextlib.suppress(psutil.Error):  # the gofer is a sibling, in the same cgroup
            siblings = psutil.Process(self.host_pid).parent().children()
            pids += [
                p.pid
                for p in siblings
                if p.pid != self.host_pid and _in_cgroup_of(p.pid, self.container_id)
            ]
        sizes = [tree_pss(pid) for pid in pids]
        return None if sizes[0] is None else sum(size or 0 for size in sizes)

    def log_tail(self, max_chars: int = 2000) -> str:
        # Sync by contract (used on error paths); after removal the last copy is kept.
        if self._removed:
            return self._last_log[-max_chars:]
        return self._logs(max_chars) or self._last_log[-max_chars:]


class DockerBackend(KernelBackend):
    """Kernels in containers of `image`. One instance per service process.

    Construction talks to the daemon (synchronously, once): it checks the image, removes
    containers orphaned by a service that is gone (`reap_orphans`), and starts the event
    stream that reports deaths. `close()` removes every container this backend made.

    Users and files. The kernel must read and replace what the service writes into the working
    directory (uploads, saved images) and the service must read and delete what the kernel
    writes there and in the runtime directory (sockets). So:
      - service not root: the container runs as the service's own uid:gid; both sides own
        everything they create, no chown is needed. The uid need not exist in the image.
      - service root: the container runs as the image's `sandbox` user (1000:1000) and the
        workdir tree and runtime directory are chowned to it at each start; root reads and
        deletes anything. Files the service writes later are chowned to it too (`file_owner`).
    `user=(uid, gid)` overrides the choice.
    """

    name = "docker"

    def __init__(
        self,
        config: KernelConfig | None = None,
        *,
        image: str = DEFAULT_IMAGE,
        client: docker.DockerClient | None = None,
        runtime_root: Path | None = None,
        user: tuple[int, int] | None = None,
        tmp_bytes: int = 256 * 1024**2,
        log_bytes: int = 1024**2,
        max_workers: int = 16,
        reap: bool = True,
        host_paths: HostPaths | None = None,
        runtime: str | None = None,
        orphan_watcher: bool = True,
    ) -> None:
        super().__init__(config)
        self.image = image
        self.instance = uuid.uuid4().hex
        self.tmp_bytes = tmp_bytes
        self.log_bytes = log_bytes
        self.client = client or docker.from_env(max_pool_size=max_workers + 2)
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="kernelbox-docker")
        self._kernels: dict[str, DockerKernel] = {}
        self._lock = threading.Lock()
        self._closed = False

        try:
            found = self.client.images.get(image)
        except ImageNotFound:
            raise RuntimeError(
                f"Docker image {image!r} not found: build it with "
                f"`scripts/build-kernel-image.sh {image}` (or `make image`)"
            ) from None
        _warn_if_stale(image, found.labels or {})
        info = self.client.info()
        #: the OCI runtime of kernels (None: the engine's default), checked now: a runtime
        #: without what kernels need fails here with what to put in daemon.json
        self.runtime = docker_runtime.check(info, runtime)

        # Socket paths must stay short, hence a fresh directory under /tmp by default. A given
        # runtime_root may be shared by backends and outlive them: each has its own lock file.
        self._own_root = runtime_root is None
        self.runtime_root = runtime_root or Path(tempfile.mkdtemp(prefix="kernelbox-docker-"))
        self.runtime_root.mkdir(parents=True, exist_ok=True)
        if len(str(self.runtime_root)) + len(_LONGEST_SOCKET) > _SOCKET_PATH_MAX:
            raise ValueError(f"runtime_root {self.runtime_root} is too long for unix sockets")
        # Bind-mount sources are the engine's host paths; a service in a container translates
        # its own (see hostpath.py). Checked now: a runtime root the engine cannot see fails
        # here, with a clear message, not at the first kernel start.
        self.host_paths = host_paths or HostPaths.detect(self.client)
        self.host_paths.to_host(self.runtime_root)
        #: what a container's uid and gid are shifted by, as this service sees files: not
        #: (0, 0) under the engine's userns-remap for a service not remapped alike
        self.id_shift = docker_runtime.userns_shift(info)
        if user is None:
            user = SANDBOX_UID_GID if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        self.user = user  # as the container sees it
        owner = self.host_ids(*user)
        self._chown = owner != (os.geteuid(), os.getegid())
        if self._chown and self.id_shift != (0, 0) and os.geteuid() != 0:
            raise RuntimeError(
                "the Docker engine remaps user namespaces (userns-remap): a kernel's files "
                f"belong to uid {owner[0]} on the host, which only a root service can give them; "
                "run the service as root"
            )
        self.file_owner = owner if self._chown else None
        # Held for the life of this backend: while it is held, our containers are not orphans.
        # flock is released by the kernel when the process dies, however it dies.
        self._lock_path = self.runtime_root / f"owner-{self.instance}.lock"
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._owner_labels = {
            LABEL_INSTANCE: self.instance,
            LABEL_PID: str(os.getpid()),
            LABEL_PID_START: _process_start(os.getpid()),
            LABEL_PIDNS: _pid_ns(),
            LABEL_BOOT: _boot_id(),
            LABEL_LOCK: str(self._lock_path),
        }
        if self.host_paths.container_id:
            self._owner_labels[LABEL_CONTAINER] = self.host_paths.container_id
            self._owner_labels[LABEL_CONTAINER_START] = self.host_paths.container_started or ""

        if reap:
            self.reap_orphans()
        # Replay from a little before now, so a reconnect of the stream misses nothing.
        self._events_since = int(time.time()) - 1
        self._events: Any = None
        self._watcher = threading.Thread(
            target=self._watch_deaths, name="kernelbox-docker-events", daemon=True
        )
        self._watcher.start()
        self._reaper = self._start_reaper(orphan_watcher and client is None)

    @classmethod
    def from_settings(cls, config: KernelConfig, settings: Any) -> DockerBackend:
        host_paths = None  # found by the backend (see hostpath.py)
        if settings.host_data_dir is not None:
            host_paths = HostPaths.fixed(settings.data_dir, settings.host_data_dir)
        # Kernel sockets next to the sessions' files: for a service in a container, on the
        # volume the engine binds into kernels, where a restarted service finds the locks that
        # tell it which kernels are orphans.
        return cls(
            config,
            image=settings.image,
            runtime_root=settings.data_dir / "run",
            host_paths=host_paths,
            runtime=settings.docker_runtime,
        )

    def _start_reaper(self, own_client: bool) -> subprocess.Popen | None:
        """The watcher that removes our containers if this process dies without closing
        (docker_reaper.py): in a session of its own, so that nothing aimed at the service's
        process group reaches it. Only with a client made from the environment, which the
        watcher makes again."""
        if not own_client:
            return None
        return subprocess.Popen(
            # -P: not its own directory first on sys.path, where docker.py would shadow docker-py
            [sys.executable, "-P", str(REAPER_SCRIPT), str(self._lock_path), self.instance],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )

    # -- helpers -----------------------------------------------------------------------------

    async def _call(self, fn, *args, **kwargs):
        if self._closed:  # our pool is shut down; a late cleanup still has to run
            return await asyncio.to_thread(fn, *args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def _remove(self, container_id: str) -> None:
        try:
            self.client.api.remove_container(container_id, force=True, v=True)
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code != 409:  # 409: removal already in progress
                raise

    def _forget(self, kernel: DockerKernel) -> None:
        with self._lock:
            self._kernels.pop(kernel.container_id, None)

    def containers(self) -> list:
        """This backend's containers (running or not)."""
        return self.client.containers.list(
            all=True, filters=our_containers_filter(self.instance), ignore_removed=True
        )

    # -- start -------------------------------------------------------------------------------

    async def start(self, workdir: Path, env: dict[str, str] | None = None) -> DockerKernel:
        workdir = Path(workdir).resolve()
        kernel_id = uuid.uuid4().hex[:12]
        runtime_dir = Path(tempfile.mkdtemp(prefix="k-", dir=self.runtime_root))
        try:
            info = new_connection_info(runtime_dir)
            inside = connection_info_at(info, CONTAINER_RUNTIME)
            write_connection_file(runtime_dir / "connection.json", inside)
            if self._chown:
                await self._call(self._give_to_kernel, workdir, runtime_dir)
        except BaseException:
            shutil.rmtree(runtime_dir, ignore_errors=True)
            raise
        kernel = await self.launch(kernel_id, workdir, runtime_dir, env or {}, info=info)
        if self._chown:
            loop = asyncio.get_running_loop()
            kernel._sealer = loop.create_task(kernel._seal_runtime_dir(self.config.start_timeout))
        return kernel

    async def launch(
        self,
        kernel_id: str,
        workdir: Path | None,
        runtime_dir: Path,
        env: dict[str, str],
        *,
        info: dict | None = None,
        customize: Callable[[dict[str, Any]], None] | None = None,
    ) -> DockerKernel:
        """Create, register and start one container of ours, hardened as a kernel's.

        `customize` may change the container's arguments before it is created (the fork
        server's template does: another entry point, no working directory mount). On failure
        nothing is left: the container is removed and `runtime_dir` too.
        """
        if self._closed:
            raise RuntimeError("the Docker backend is closed")
        try:
            kwargs = self._container_args(kernel_id, workdir, runtime_dir, env)
            if customize is not None:
                customize(kwargs)
            container = await self._call(self.client.containers.create, **kwargs)
        except BaseException:
            shutil.rmtree(runtime_dir, ignore_errors=True)
            raise
        loop = asyncio.get_running_loop()
        kernel = DockerKernel(
            self, container, kernel_id, workdir or runtime_dir, runtime_dir, info or {}, loop
        )
        # Registered before it starts, so its die event cannot arrive unclaimed.
        with self._lock:
            self._kernels[kernel.container_id] = kernel
        try:
            await self._call(container.start)
            state = (await self._call(kernel._inspect))["State"]
        except BaseException as exc:
            await kernel.kill()
            await kernel.cleanup()
            if isinstance(exc, APIError) and self.runtime.gvisor and self.id_shift != (0, 0):
                raise RuntimeError(
                    f"{exc}. gVisor under the engine's userns-remap: runsc 2022-12 cannot "
                    "remount a container's root read-only in a user namespace; run kernels "
                    "under runc with userns-remap, or under runsc without it"
                ) from exc
            raise
        pid = state.get("Pid") or None
        # The engine's pid is the host's: meaningless in a service that runs in a container
        # of its own (another pid namespace), where it may even name another process.
        kernel.host_pid = pid if pid and _in_cgroup_of(pid, kernel.container_id) else None
        return kernel

    def host_ids(self, uid: int, gid: int) -> tuple[int, int]:
        """The host's ids for a container's `uid` and `gid` (see `id_shift`)."""
        return uid + self.id_shift[0], gid + self.id_shift[1]

    def _give_to_kernel(self, workdir: Path, runtime_dir: Path) -> None:
        uid, gid = self.host_ids(*self.user)
        os.chown(runtime_dir, uid, gid)
        os.chown(runtime_dir / "connection.json", uid, gid)
        # Through directory descriptors, never a link (the kernel may have planted links to
        # host files), iteratively (its tree may be thousands of levels deep).
        if not give_tree(workdir, (uid, gid)):
            log.warning("%s: too many entries to give them all to the kernel", workdir)

    def _container_args(
        self, kernel_id: str, workdir: Path | None, runtime_dir: Path, extra: dict[str, str]
    ) -> dict:
        cfg = self.config
        lim = cfg.limits
        env = kernel_env(cfg, Path(CONTAINER_WORKDIR), Path(CONTAINER_RUNTIME), extra)
        # kernel_env derives these from the host; use the container's (unless asked otherwise).
        for key, value in {
            "PATH": CONTAINER_PATH,
            "TMPDIR": "/tmp",  # the size-limited tmpfs, not the host disk
            "IPYTHONDIR": "/tmp/ipython",
            "MPLCONFIGDIR": "/tmp/matplotlib",  # the entrypoint copies the prebuilt cache here
        }.items():
            if key not in cfg.env and key not in extra:
                env[key] = value
        env.update(boot_env(cfg))

        ulimits = [Ulimit(name="core", soft=0, hard=0)]
        if lim.open_files is not None:
            ulimits.append(Ulimit(name="nofile", soft=lim.open_files, hard=lim.open_files))
        if lim.file_size_bytes is not None:
            size = int(lim.file_size_bytes)
            ulimits.append(Ulimit(name="fsize", soft=size, hard=size))
        limits: dict[str, Any] = {}
        if lim.memory_bytes is not None:
            # memswap = memory: no swap, so a memory bomb ends in the OOM killer, not thrashing.
            limits["mem_limit"] = limits["memswap_limit"] = int(lim.memory_bytes)
        if lim.cpus is not None:
            limits["nano_cpus"] = int(lim.cpus * 1e9)
        if lim.nice:
            # Niceness only ranks processes inside one cgroup; between the service and the
            # kernel containers it is CPU shares that decide (1024 is everyone's default).
            limits["cpu_shares"] = 256
        if lim.pids is not None:
            limits["pids_limit"] = self.runtime.host_pids(int(lim.pids))
            if self.runtime.gvisor:  # per sandbox there (see docker_runtime.py)
                ulimits.append(Ulimit(name="nproc", soft=int(lim.pids), hard=int(lim.pids)))
        uid, gid = self.user
        return {
            "image": self.image,
            "command": ["-f", f"{CONTAINER_RUNTIME}/connection.json"],
            "name": f"kernelbox-{self.instance[:8]}-{kernel_id}",
            "hostname": "sandbox",
            "labels": {
                **self._owner_labels,
                LABEL_KERNEL: kernel_id,
                LABEL_CREATED: str(int(time.time())),
            },
            "environment": env,
            "user": f"{uid}:{gid}",
            "working_dir": CONTAINER_WORKDIR,
            "network_mode": "none",
            "read_only": True,
            "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={int(self.tmp_bytes)},mode=1777"},
            "mounts": [
                *(
                    [Mount(CONTAINER_WORKDIR, str(self.host_paths.to_host(workdir)), type="bind")]
                    if workdir is not None
                    else []
                ),
                Mount(CONTAINER_RUNTIME, str(self.host_paths.to_host(runtime_dir)), type="bind"),
            ],
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "ipc_mode": "private",
            "ulimits": ulimits,
            # What the kernel's processes print outside the protocol (os.system("yes")) must
            # not fill the host's disk.
            "log_config": LogConfig(
                type="json-file", config={"max-size": str(self.log_bytes), "max-file": "1"}
            ),
            **limits,
            "runtime": self.runtime.name,
        }

    # -- deaths ------------------------------------------------------------------------------

    def _watch_deaths(self) -> None:
        filters = {
            "type": "container",
            "event": ["die"],
            "label": [f"{LABEL_INSTANCE}={self.instance}"],
        }
        reconnect = False
        while not self._closed:
            try:
                self._events = self.client.events(
                    decode=True, since=self._events_since, filters=filters
                )
                if self._closed:
                    break
                if reconnect:
                    self._sweep()  # deaths the daemon no longer remembers (it restarted)
                for event in self._events:
                    # Replays after a reconnect start here; a repeated event is harmless.
                    self._events_since = max(self._events_since, int(event.get("time", 0)) - 1)
                    attrs = event.get("Actor", {}).get("Attributes", {})
                    self._on_die(event.get("id", ""), attrs.get("exitCode"))
            except Exception as exc:
                if self._closed:
                    break
                log.warning("Docker event stream broke (%s); reconnecting", exc)
                reconnect = True
                time.sleep(1.0)

    def _sweep(self) -> None:
        with self._lock:
            ids = list(self._kernels)
        for container_id in ids:
            try:
                state = self.client.api.inspect_container(container_id)["State"]
            except NotFound:
                state = {"Running": False, "Status": "removed"}
            except DockerException:
                continue
            if not state.get("Running") and state.get("Status") != "created":
                self._on_die(container_id, str(state.get("ExitCode", "")))

    def _on_die(self, container_id: str, code: str | None) -> None:
        with self._lock:
            kernel = self._kernels.get(container_id)
        if kernel is None:
            return
        exit_code = int(code) if code not in (None, "") else None
        oom = False
        try:
            state = self.client.api.inspect_container(container_id)["State"]
            oom = bool(state.get("OOMKilled"))
            exit_code = state.get("ExitCode", exit_code)
        except DockerException:
            pass  # removed already (kill): the event's exit code is what we have
        kernel._died(exit_info(exit_code, oom), kernel._logs(4000))

    # -- orphans -----------------------------------------------------------------------------

    def reap_orphans(self) -> list[str]:
        """Remove containers whose owning service is gone; returns their names.

        The owner of a container is a backend in some process. It is gone when:
          - the host has rebooted since (boot id differs): nothing of it can be running; or
          - its lock file can be locked: the owner held an exclusive flock on it for its whole
            life, and the OS drops it when the process ends, SIGKILL included (and unlike a
            pid, a lock cannot be mistaken for a newer process that reused the number); or
          - its lock file is not to be seen here and the owner ran in a container (a service
            deployed with docker-compose.yml) that is gone, stopped, or restarted since; or
          - its lock file is gone (its runtime directory was deleted, so its kernels cannot be
            reached either) and, in our pid namespace, the recorded pid is dead or now belongs
            to a process with another start time.
        Otherwise (another pid namespace without a visible lock) it is left alone: never kill
        the kernels of a service that may be alive.
        """
        try:
            found = self.client.containers.list(
                all=True, filters=our_containers_filter(), ignore_removed=True
            )
        except DockerException as exc:
            log.warning("could not list containers to remove orphans: %s", exc)
            return []
        verdicts: dict[str, bool] = {}
        held: dict[str, int] = {}  # lock path -> fd we locked: its owner is gone
        removed = []
        try:
            for container in found:
                labels = container.labels
                instance = labels.get(LABEL_INSTANCE, "")
                if instance == self.instance:
                    continue
                if instance not in verdicts:
                    verdicts[instance] = self._owner_gone(labels, held)
                if verdicts[instance]:
                    log.info("removing orphaned kernel container %s", container.name)
                    with contextlib.suppress(DockerException):
                        self._remove(container.id)
                        removed.append(container.name)
                    self._remove_runtime_dir(container, labels.get(LABEL_LOCK, ""), held)
        finally:
            for lock_path, fd in held.items():
                # The dead owner's files go too: its whole root if it made it, else its lock.
                root = Path(lock_path).parent
                if root.name.startswith("kernelbox-docker-"):
                    shutil.rmtree(root, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(lock_path)
                os.close(fd)
        return removed

    def _remove_runtime_dir(self, container: Any, lock_path: str, held: dict[str, int]) -> None:
        # Only a directory next to a lock we hold: a label or mount is no licence to delete.
        if lock_path not in held:
            return
        root = Path(lock_path).parent
        try:
            host_root = self.host_paths.to_host(root)  # mount sources are the engine's paths
        except RuntimeError:
            return
        for mount in container.attrs.get("Mounts", []):
            source = Path(mount.get("Source") or "/")
            if mount.get("Destination") == CONTAINER_RUNTIME and source.parent == host_root:
                shutil.rmtree(root / source.name, ignore_errors=True)

    def _owner_gone(self, labels: dict[str, str], held: dict[str, int]) -> bool:
        if labels.get(LABEL_BOOT) and _boot_id() and labels[LABEL_BOOT] != _boot_id():
            return True
        lock_path = labels.get(LABEL_LOCK, "")
        if lock_path:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                fd = -1
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    os.close(fd)
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        log.warning("cannot tell whether %s is held: %s", lock_path, exc)
                    return False  # the owner holds it (alive), or we cannot tell
                held[lock_path] = fd  # kept until its containers are removed
                return True
        if labels.get(LABEL_CONTAINER):
            # An owner in a container whose lock we cannot see: that container is gone, not
            # running, or was restarted since (a new process: the owner died).
            try:
                state = self.client.api.inspect_container(labels[LABEL_CONTAINER])["State"]
            except NotFound:
                return True
            except DockerException as exc:
                log.warning("cannot tell whether the owner of a kernel is alive: %s", exc)
                return False
            started = labels.get(LABEL_CONTAINER_START)
            return not state.get("Running") or bool(started and state.get("StartedAt") != started)
        if labels.get(LABEL_PIDNS) == _pid_ns() and labels.get(LABEL_PID, "").isdigit():
            pid = int(labels[LABEL_PID])
            return _process_start(pid) != labels.get(LABEL_PID_START)
        return False

    # -- close -------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            kernels = list(self._kernels.values())

        async def stop(kernel: DockerKernel) -> None:
            with contextlib.suppress(Exception):
                await kernel.kill()
                await kernel.cleanup()

        await asyncio.gather(*(stop(k) for k in kernels))
        self._closed = True
        # Anything of ours the registry missed (a start interrupted mid-way).
        for container in await self._call(self.containers):
            with contextlib.suppress(DockerException):
                await self._call(self._remove, container.id)
        if self._events is not None:
            with contextlib.suppress(Exception):
                self._events.close()
        self._executor.shutdown(wait=False)
        if self._own_root:
            shutil.rmtree(self.runtime_root, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                self._lock_path.unlink()
            with contextlib.suppress(OSError):  # shared with other backends: only if empty
                self.runtime_root.rmdir()
        os.close(self._lock_fd)  # the reaper takes the lock, finds nothing, and ends
        if self._reaper is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self._reaper.wait, 30)
