"""The Docker backend's one-shot kernels: forked in a kernel-template container, not a container
each.

A throwaway kernel (/run_jupyter's: used for one request, then discarded) in a container of
its own pays a container start and an interpreter start, about 1.7 s. Here one container of
the kernel image runs the fork server (forkserver_boot.py --kernels) with ipykernel and the
data stack imported, and each throwaway kernel is a child of it that becomes a kernel, with
the isolation the fork server's runs have on Docker: a uid and gid of its own from the
template's range (it cannot read, signal or trace another kernel or the template), no
capability, no SysV IPC, rlimits (address space, file size, open files, processes of its
uid), niceness, a scratch directory of its own; what it left in the shared /tmp and /dev/shm
is swept by uid when it ends. The container has what every kernel container has (no network
but loopback, a read-only root, no-new-privileges, memory, CPU and pids limits), shared by its
kernels: memory is one kernel's limit plus KERNEL_SLOT_BYTES per slot, CPU one kernel's per
core. Loopback is shared too, as it is between the fork server's runs: kernels running at the
same moment could reach each other's listening TCP ports.

Sessions keep a container each: their memory, CPU and pids limits are a cgroup of their own.

Per kernel, made by the service and given to the kernel's uid before the fork: its sockets and
connection file in `k-<id>/` of the template's runtime directory (bind-mounted at
/run/kernelbox), and its working directory under the backend's `oneshot_dir` (bind-mounted at
CONTAINER_ONESHOT). The service chooses the uid (the template takes it only if no live kernel
has it) and gets it back once the template has said the kernel ended and was swept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import (
    ExitInfo,
    KernelProcess,
    TemplateOptions,
    connection_info_at,
    new_connection_info,
    write_connection_file,
)
from .docker_files import seal_runtime_dir
from .docker_spec import CONTAINER_ONESHOT, CONTAINER_PATH, CONTAINER_RUNTIME
from .forkserver_wire import SETUP_FAILED, ForkServerError, Template
from .launch import OutputTail, boot_env, describe_exit, kernel_env, rlimits_for

if TYPE_CHECKING:
    from .docker import DockerBackend

log = logging.getLogger(__name__)

#: a kernel's connection file, found in JUPYTER_RUNTIME_DIR (forkserver_boot.py parses the
#: command line once for every kernel it forks)
CONNECTION_FILE = "connection.json"
#: how long a forked kernel may live at most (the template kills it then)
MAX_LIFETIME = 24 * 3600.0
#: how long a kill waits for the template to say the kernel is gone and swept
KILL_WAIT = 30.0


class ForkedDockerKernel(KernelProcess):
    """A kernel forked in a kernel-template container (see the module docstring)."""

    backend_name = "docker"

    def __init__(
        self,
        owner: KernelForker,
        conn: socket.socket,
        uid: int,
        workdir: Path,
        runtime_dir: Path,
        info: dict,
        output: OutputTail,
        result_fd: int,
        file_owner: tuple[int, int] | None,
    ) -> None:
        self._owner = owner
        self._conn = conn
        self.uid = uid
        self.workdir = workdir
        self.runtime_dir = runtime_dir
        self.connection_info = info
        self._output = output
        self._result_fd = result_fd
        self.file_owner = file_owner
        self._ended: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self._watch = asyncio.ensure_future(self._watch_conn())
        self._sealer: asyncio.Task[None] | None = None

    async def _watch_conn(self) -> None:
        """The template's one line when the kernel has ended and what it left is swept (or a
        refusal); EOF without one: the template is gone, and its kernels with it."""
        loop = asyncio.get_running_loop()
        info = ExitInfo(None, "lost its kernel template")
        buf = b""
        try:
            while not buf.endswith(b"\n") and len(buf) < 65536:
                chunk = await loop.sock_recv(self._conn, 4096)
                if not chunk:
                    break
                buf += chunk
            if buf.endswith(b"\n"):
                info = self._exit_info(json.loads(buf))
                self._owner.give_back(self.uid)  # swept: no process of that uid is left
        except (OSError, ValueError) as exc:
            info = ExitInfo(None, f"lost its kernel template ({exc})")
        finally:
            if not self._ended.done():
                self._ended.set_result(info)

    def _exit_info(self, reply: dict) -> ExitInfo:
        if reply.get("error"):
            return ExitInfo(255, f"could not start: {reply['error']}")
        if reply.get("timeout"):
            return ExitInfo(None, f"killed after {MAX_LIFETIME:.0f} s, the longest it may live")
        code = reply.get("exit")
        if code == SETUP_FAILED:
            said = os.pread(self._result_fd, 60000, 0)
            if said.startswith(b"E"):
                return ExitInfo(255, f"could not start: {said[1:].decode(errors='replace')}")
        return describe_exit(code)

    async def poll(self) -> ExitInfo | None:
        return self._ended.result() if self._ended.done() else None

    async def wait(self) -> ExitInfo:
        return await asyncio.shield(self._ended)

    async def send_signal(self, signum: int) -> None:
        """SIGINT interrupts (the template sends it to the kernel's process group); any other
        signal ends the kernel."""
        if self._ended.done():
            return
        if signum != signal.SIGINT:
            await self.kill()
            return
        with contextlib.suppress(OSError):
            self._conn.send(b"I")

    async def kill(self) -> None:
        if self._ended.done():
            return
        with contextlib.suppress(OSError):
            self._conn.shutdown(socket.SHUT_WR)  # the template kills it, then says so
        try:
            await asyncio.wait_for(self.wait(), KILL_WAIT)
        except TimeoutError:
            log.warning("kernel template did not report a killed kernel within %.0f s", KILL_WAIT)
            self._ended.set_result(ExitInfo(-9, "killed by signal 9 (SIGKILL)"))

    async def cleanup(self) -> None:
        for task in (self._watch, self._sealer):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._conn.close()
        self._output.close()
        if self._result_fd >= 0:
            os.close(self._result_fd)
            self._result_fd = -1
        # Its uid went back only when the template said it was swept (a kernel given it
        # earlier would be swept too); a template that never said is gone, and its range.
        self._owner.forget(self)
        await asyncio.to_thread(shutil.rmtree, self.runtime_dir, True)

    def log_tail(self, max_chars: int = 2000) -> str:
        return self._output.tail(max_chars)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "forked": True, "uid": self.uid}


class KernelForker:
    """The Docker backend's kernel template: started on first use, replaced when it dies;
    `fork` returns None while there is none (the backend starts a container instead)."""

    def __init__(self, backend: DockerBackend, slots: int = 32, prefork: int = 4) -> None:
        self.backend = backend
        self.options = TemplateOptions(
            slots=slots, prefork=prefork, preload=(), hugepages=False, kernels=True
        )
        self.template: Template | None = None
        self._starting: asyncio.Task[Template] | None = None
        self._free: list[int] = []
        self._range = range(0)  # the running template's uids
        self._kernels: set[ForkedDockerKernel] = set()
        self._retry_at = 0.0

    async def _ready(self) -> Template | None:
        if self.template is not None and self.template.alive:
            return self.template
        if self.template is not None:
            why = self.template.proc.log_tail(500)
            log.warning("kernel template died (%s); starting another", why)
            await self.template.discard()
            self.template = None
        if self._starting is None:
            if time.monotonic() < self._retry_at:
                return None
            self._starting = asyncio.ensure_future(self._start())
        try:
            return await asyncio.shield(self._starting)
        except Exception as exc:
            self._retry_at = time.monotonic() + 5.0
            log.warning("kernel template did not start (%s); containers meanwhile", exc)
            return None
        finally:
            if self._starting is not None and self._starting.done():
                self._starting = None

    async def _start(self) -> Template:
        proc = await self.backend.launch_template(self.options)
        template = Template(proc, self.options.slots)
        try:
            await template.wait_ready(self.backend.config.start_timeout)
            if not template.info.get("kernels") or not template.info.get("uid_base"):
                raise ForkServerError(
                    "the image's fork server forks no kernels; rebuild the kernel image"
                )
        except BaseException:
            await template.discard()
            raise
        base = int(template.info["uid_base"])
        self._range = range(base, base + self.options.slots)
        self._free = list(self._range)
        self.template = template
        return template

    def give_back(self, uid: int) -> None:
        if uid in self._range and uid not in self._free:
            self._free.append(uid)

    def forget(self, kernel: ForkedDockerKernel) -> None:
        self._kernels.discard(kernel)

    async def fork(self, workdir: Path, env: dict[str, str]) -> ForkedDockerKernel | None:
        """A kernel for `workdir` (under the backend's `oneshot_dir`), or None where no
        template serves or every uid is taken."""
        for _attempt in range(2):  # a template that went away unseen is replaced once
            template = await self._ready()
            if template is None or not self._free:
                return None
            uid = self._free.pop(0)  # the longest free: the template has surely swept it
            try:
                return await self._fork(template, uid, workdir, env)
            except (ConnectionError, FileNotFoundError) as exc:
                log.warning("kernel template unreachable (%s); replacing it", exc)
                if template is self.template:
                    self.template = None
                    await template.discard()
            except BaseException:
                self._free.append(uid)
                raise
        return None

    async def _fork(
        self, template: Template, uid: int, workdir: Path, env: dict[str, str]
    ) -> ForkedDockerKernel:
        backend = self.backend
        inside_workdir = Path(CONTAINER_ONESHOT) / workdir.relative_to(backend.oneshot_dir)
        kid = uuid.uuid4().hex[:12]
        runtime_dir = template.proc.runtime_dir / f"k-{kid}"
        inside_runtime = Path(CONTAINER_RUNTIME) / runtime_dir.name
        owner = backend.host_ids(uid, uid)
        info = new_connection_info(runtime_dir)

        def prepare() -> None:
            runtime_dir.mkdir(mode=0o700)
            inside = connection_info_at(info, inside_runtime)
            write_connection_file(runtime_dir / CONNECTION_FILE, inside)
            for path in (runtime_dir, runtime_dir / CONNECTION_FILE, workdir):
                os.chown(path, *owner)
            os.chmod(workdir, 0o700)

        await asyncio.to_thread(prepare)
        request = {
            "argv": ["-f", CONNECTION_FILE],
            "env": self._environment(inside_workdir, inside_runtime, env),
            "workdir": str(inside_workdir),
        }
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            conn, result_fd = await template.fork_kernel(uid, request, out_w, MAX_LIFETIME)
        except BaseException:
            os.close(out_r)
            shutil.rmtree(runtime_dir, ignore_errors=True)
            raise
        finally:
            os.close(out_w)
        kernel = ForkedDockerKernel(
            self, conn, uid, workdir, runtime_dir, info, OutputTail(out_r), result_fd, owner
        )
        self._kernels.add(kernel)
        kernel._sealer = asyncio.get_running_loop().create_task(
            seal_runtime_dir(info, runtime_dir, kernel._ended.done, backend.config.start_timeout)
        )
        return kernel

    def _environment(self, workdir: Path, runtime: Path, extra: dict[str, str]) -> dict[str, str]:
        """A kernel container's environment, with what the fork server's child reads (its
        rlimits; TMPDIR and the like it sets to its own scratch directory)."""
        cfg = self.backend.config
        env = kernel_env(cfg, workdir, runtime, extra)
        env.update(PATH=CONTAINER_PATH, JUPYTER_RUNTIME_DIR=str(runtime))
        env.update(boot_env(cfg))
        env["KERNELBOX_RLIMITS"] = json.dumps(rlimits_for(cfg.limits, per_sandbox=True))
        return env

    async def close(self) -> None:
        for kernel in list(self._kernels):
            with contextlib.suppress(Exception):
                await kernel.kill()
                await kernel.cleanup()
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting
        if self.template is not None:
            await self.template.discard()
            self.template = None
