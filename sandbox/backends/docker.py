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

The jobs are split: the container's arguments (docker_spec.py), who owns which files
(docker_files.py), the owner labels (docker_owner.py), deaths (docker_watch.py), orphans
(docker_orphans.py, and the watcher process docker_reaper.py); this module holds the handle
and the backend that ties them together.

Blocking docker-py calls run in the backend's own thread pool (never the event loop's default
one, which a slow Docker daemon would otherwise starve). Deaths are learnt from one Docker
event stream per backend rather than one blocking `wait` per container.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import psutil
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from . import docker_runtime
from .base import (
    ExitInfo,
    KernelBackend,
    KernelConfig,
    KernelProcess,
    TemplateOptions,
    connection_info_at,
    new_connection_info,
    template_connection_info,
    write_connection_file,
)
from .docker_files import SANDBOX_UID_GID, Ownership, seal_runtime_dir
from .docker_forked import KernelForker
from .docker_orphans import owner_gone, reap_orphans
from .docker_owner import (  # re-exported: the labels are this backend's public face
    LABEL_BOOT,
    LABEL_CONTAINER,
    LABEL_CONTAINER_START,
    LABEL_CREATED,
    LABEL_INSTANCE,
    LABEL_KERNEL,
    LABEL_LOCK,
    LABEL_PID,
    LABEL_PID_START,
    LABEL_PIDNS,
    in_cgroup_of,
    our_containers_filter,
    owner_labels,
)
from .docker_spec import (
    CONTAINER_RUNTIME,
    CONTAINER_WORKDIR,
    ContainerTarget,
    as_template,
    exit_info,
    kernel_container,
    oneshot_dir,
    warn_if_stale,
)
from .docker_watch import DeathWatcher
from .hostpath import HostPaths
from .kept import DB_NAME, kept_containers
from .launch import TEMPLATE_SOCKET, tree_pss

__all__ = [
    "CONTAINER_RUNTIME",
    "CONTAINER_WORKDIR",
    "LABEL_BOOT",
    "LABEL_CONTAINER",
    "LABEL_CONTAINER_START",
    "LABEL_CREATED",
    "LABEL_INSTANCE",
    "LABEL_KERNEL",
    "LABEL_LOCK",
    "LABEL_PID",
    "LABEL_PIDNS",
    "LABEL_PID_START",
    "SANDBOX_UID_GID",
    "DockerBackend",
    "DockerKernel",
    "our_containers_filter",
]

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "kernelbox-kernel:latest"
REAPER_SCRIPT = Path(__file__).with_name("docker_reaper.py")

# A unix socket path has room for 107 bytes. Ours, under the runtime root: a kernel's
# "k-xxxxxxxx/k-5", a fork-server template's "f-xxxxxxxx/fs.sock", and a kernel forked in a
# kernel template, "f-xxxxxxxx/k-xxxxxxxxxxxx/k-5" (the longest).
_SOCKET_PATH_MAX = 107
_LONGEST_SOCKET = "/f-xxxxxxxx/k-xxxxxxxxxxxx/k-5"  # a forked kernel's (docker_forked.py)


class DockerKernel(KernelProcess):
    """One kernel (or fork-server template) container. Created by `DockerBackend._launch`."""

    backend_name = "docker"

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
        #: for a container attached from another backend (see DockerBackend.attach)
        self._poller: asyncio.Task[None] | None = None

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
        for task in (self._sealer, self._poller):
            if task is not None:
                task.cancel()
        self._backend._forget(self)
        await self._backend._call(shutil.rmtree, self.runtime_dir, True)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "container_id": self.container_id,
            "kernel_id": self.kernel_id,
        }

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
                if p.pid != self.host_pid and in_cgroup_of(p.pid, self.container_id)
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

    Users and files: see docker_files.py; `user=(uid, gid)` overrides the choice made there.
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
        sessions_db: Path | None = None,
        fork_throwaways: bool = True,
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
        #: the session registry (backends/kept.py): containers it names are not orphans
        self.sessions_db = sessions_db
        #: containers of ours handed over to the next service (see `detach`)
        self._detached: set[str] = set()

        try:
            found = self.client.images.get(image)
        except ImageNotFound:
            raise RuntimeError(
                f"Docker image {image!r} not found: build it with "
                f"`scripts/build-kernel-image.sh {image}` (or `make image`)"
            ) from None
        warn_if_stale(image, found.labels or {})
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
        self.ownership = Ownership.decide(user, docker_runtime.userns_shift(info))
        #: what a container's uid and gid are shifted by, as this service sees files: not
        #: (0, 0) under the engine's userns-remap for a service not remapped alike
        self.id_shift = self.ownership.id_shift
        self.user = self.ownership.user  # as the container sees it
        self.file_owner = self.ownership.file_owner
        # Held for the life of this backend: while it is held, our containers are not orphans.
        # flock is released by the kernel when the process dies, however it dies.
        self._lock_path = self.runtime_root / f"owner-{self.instance}.lock"
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._target = ContainerTarget(
            config=self.config,
            image=image,
            instance=self.instance,
            labels=owner_labels(self.instance, str(self._lock_path), self.host_paths),
            user=self.user,
            runtime=self.runtime,
            tmp_bytes=tmp_bytes,
            log_bytes=log_bytes,
        )

        #: throwaway kernels (/run_jupyter's) forked in a kernel template (docker_forked.py);
        #: only a root service can give each its uid's files
        self.forks_kernels = fork_throwaways and os.geteuid() == 0
        self._forker = KernelForker(self) if self.forks_kernels else None
        if self.forks_kernels:
            # Their working directories: reached by nothing but the kernel template, which
            # cannot list it (each kernel's is its uid's, 0700).
            self.oneshot_dir = oneshot_dir(self.runtime_root.resolve(), self.instance)
            self.oneshot_dir.mkdir(mode=0o711)

        if reap:
            self.reap_orphans()
        self._watcher = DeathWatcher(self.client, self.instance, self._find, self._watched)
        self._reaper = self._start_reaper(orphan_watcher and client is None)

    @classmethod
    def from_settings(cls, config: KernelConfig, settings: Any) -> DockerBackend:
        host_paths = None  # found by the backend (see hostpath.py)
        if settings.host_data_dir is not None:
            host_paths = HostPaths.fixed(settings.data_dir, settings.host_data_dir)
        # Kernel sockets next to the sessions' files: for a service in a container, on the
        # volume the engine binds into kernels, where a restarted service finds the locks that
        # tell it which kernels are orphans, and the sessions whose kernels are not.
        return cls(
            config,
            image=settings.image,
            runtime_root=settings.data_dir / "run",
            host_paths=host_paths,
            runtime=settings.docker_runtime,
            sessions_db=settings.data_dir / DB_NAME,
            fork_throwaways=settings.docker_throwaway == "forked",
        )

    def _start_reaper(self, own_client: bool) -> subprocess.Popen | None:
        """The watcher that removes our containers if this process dies without closing
        (docker_reaper.py): in a session of its own, so that nothing aimed at the service's
        process group reaches it. Only with a client made from the environment, which the
        watcher makes again."""
        if not own_client:
            return None
        argv = [str(self._lock_path), self.instance]
        if self.sessions_db is not None:
            argv.append(str(self.sessions_db))  # its sessions' containers are spared
        return subprocess.Popen(
            # -P: not its own directory first on sys.path, where docker.py would shadow docker-py
            [sys.executable, "-P", str(REAPER_SCRIPT), *argv],
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

    def _find(self, container_id: str) -> DockerKernel | None:
        with self._lock:
            return self._kernels.get(container_id)

    def _watched(self) -> list[str]:
        with self._lock:
            return list(self._kernels)

    def containers(self) -> list:
        """This backend's containers (running or not)."""
        return self.client.containers.list(
            all=True, filters=our_containers_filter(self.instance), ignore_removed=True
        )

    def host_ids(self, uid: int, gid: int) -> tuple[int, int]:
        """The host's ids for a container's `uid` and `gid` (see `id_shift`)."""
        return self.ownership.host_ids(uid, gid)

    # -- start -------------------------------------------------------------------------------

    async def start(self, workdir: Path, env: dict[str, str] | None = None) -> KernelProcess:
        workdir = Path(workdir).resolve()
        if self._forker is not None and self.oneshot_dir in workdir.parents:  # a throwaway's
            forked = await self._forker.fork(workdir, env or {})
            if forked is not None:
                return forked  # else (no template yet, or none can start) a container
        kernel_id = uuid.uuid4().hex[:12]
        runtime_dir = Path(tempfile.mkdtemp(prefix="k-", dir=self.runtime_root))
        try:
            info = new_connection_info(runtime_dir)
            inside = connection_info_at(info, CONTAINER_RUNTIME)
            write_connection_file(runtime_dir / "connection.json", inside)
            if self.ownership.chown:
                await self._call(self.ownership.give_to_kernel, workdir, runtime_dir)
        except BaseException:
            shutil.rmtree(runtime_dir, ignore_errors=True)
            raise
        kernel = await self._launch(kernel_id, workdir, runtime_dir, env or {}, info=info)
        if self.ownership.chown:
            kernel._sealer = asyncio.get_running_loop().create_task(
                seal_runtime_dir(info, runtime_dir, kernel._death.done, self.config.start_timeout)
            )
        return kernel

    async def launch_template(self, options: TemplateOptions) -> DockerKernel:
        template_id = f"fs{uuid.uuid4().hex[:10]}"
        # 0700 and the service's: the template gets in as its owner (see TEMPLATE_CAPS), runs
        # do not. A kernel template's kernels pass through (0711) to their own k-<id>/, but
        # cannot list it, nor connect to the template's socket (0600).
        runtime_dir = Path(tempfile.mkdtemp(prefix="f-", dir=self.runtime_root))
        if options.kernels:
            os.chmod(runtime_dir, 0o711)
        if self.id_shift != (0, 0):  # userns-remap: the template's root is another host uid
            os.chown(runtime_dir, *self.host_ids(0, 0))
        # A random uid range per template: no other container's processes share these uids
        # (RLIMIT_NPROC counts per uid across the host). The template moves it into its user
        # namespace's ids when they are fewer (userns-remap: 65536).
        uid_base = 1_000_000 + secrets.randbelow(1_000_000) * 1024
        oneshot = self.host_paths.to_host(self.oneshot_dir) if options.kernels else None
        return await self._launch(
            template_id,
            None,
            runtime_dir,
            {},
            info=template_connection_info(runtime_dir / TEMPLATE_SOCKET),
            customize=lambda kwargs: as_template(kwargs, options, self.config, uid_base, oneshot),
        )

    async def _launch(
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
            kwargs = kernel_container(
                self._target,
                kernel_id,
                self.host_paths.to_host(workdir) if workdir is not None else None,
                self.host_paths.to_host(runtime_dir),
                env,
            )
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
        self._set_host_pid(kernel, state)
        return kernel

    def _set_host_pid(self, kernel: DockerKernel, state: dict) -> None:
        pid = state.get("Pid") or None
        # The engine's pid is the host's: meaningless in a service that runs in a container
        # of its own (another pid namespace), where it may even name another process.
        kernel.host_pid = pid if pid and in_cgroup_of(pid, kernel.container_id) else None

    async def attach(self, description: dict[str, Any]) -> DockerKernel:
        """A handle on the running container that `DockerKernel.describe` described.

        Its deaths are learnt from this backend's event stream only for containers this
        backend made; for another backend's (a service restarted with its kernels kept),
        `poll` asks the engine. Such a service must not reap them as orphans first
        (`reap=False`): that is for the feature that keeps kernels across restarts to arrange.
        """
        if description.get("backend") != self.name:
            raise ValueError(f"not a {self.name} kernel: {description.get('backend')!r}")
        if self._closed:
            raise RuntimeError("the Docker backend is closed")
        container = await self._call(self.client.containers.get, description["container_id"])
        if LABEL_INSTANCE not in (container.labels or {}):
            raise ValueError(f"container {container.name} is not a kernelbox kernel")
        kernel = DockerKernel(
            self,
            container,
            container.labels.get(LABEL_KERNEL) or description.get("kernel_id", ""),
            Path(description["workdir"]),
            Path(description["runtime_dir"]),
            dict(description["connection_info"]),
            asyncio.get_running_loop(),
        )
        with self._lock:
            self._kernels[kernel.container_id] = kernel
        state = (await self._call(kernel._inspect))["State"]
        self._set_host_pid(kernel, state)
        if container.labels.get(LABEL_INSTANCE) != self.instance:
            # Not in our event stream's filter: its death is learnt by asking.
            kernel._poller = asyncio.get_running_loop().create_task(_poll_until_dead(kernel))
        elif (ended := await kernel.poll()) is not None:
            kernel._died(ended, "")
        return kernel

    # -- orphans -----------------------------------------------------------------------------

    def reap_orphans(self) -> list[str]:
        """Remove containers whose owning service is gone; returns their names (see
        docker_orphans.reap_orphans for how an owner is known to be gone)."""
        return reap_orphans(
            self.client,
            self.instance,
            self.host_paths,
            self._remove,
            keep=kept_containers(self.sessions_db),
        )

    def _owner_gone(self, labels: dict[str, str], held: dict[str, int]) -> bool:
        return owner_gone(self.client, labels, held)

    async def detach(self, proc: KernelProcess) -> bool:
        """Leave `proc`'s container running for the next service (which re-attaches to it
        through its session's record): this backend forgets it, and neither `close` nor the
        watcher process removes it. Its runtime directory stays, sockets and all."""
        if not isinstance(proc, DockerKernel) or await proc.poll() is not None:
            return await super().detach(proc)
        for task in (proc._sealer, proc._poller):
            if task is not None:
                task.cancel()
        with self._lock:
            self._detached.add(proc.container_id)
        self._forget(proc)
        return True

    # -- close -------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        if self._forker is not None:  # its kernels first, each told apart from its template
            await self._forker.close()
        with self._lock:
            kernels = list(self._kernels.values())

        async def stop(kernel: DockerKernel) -> None:
            with contextlib.suppress(Exception):
                await kernel.kill()
                await kernel.cleanup()

        await asyncio.gather(*(stop(k) for k in kernels))
        self._closed = True
        # Anything of ours the registry missed (a start interrupted mid-way), but not what
        # was handed over to the next service.
        for container in await self._call(self.containers):
            if container.id in self._detached:
                continue
            with contextlib.suppress(DockerException):
                await self._call(self._remove, container.id)
        self._watcher.close()
        self._executor.shutdown(wait=False)
        if self.oneshot_dir is not None:
            shutil.rmtree(self.oneshot_dir, ignore_errors=True)
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


async def _poll_until_dead(kernel: DockerKernel, interval: float = 1.0) -> None:
    while True:
        ended = await kernel.poll()
        if ended is not None:
            kernel._died(ended, "")
            return
        await asyncio.sleep(interval)
