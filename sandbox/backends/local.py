"""The local backend: ipykernel as a child process of the service, in a sandbox of its own.

Where bubblewrap works (see bwrap.py for what the sandbox holds and how), each kernel runs in
a bwrap sandbox: no view of the service's processes, environment, command line or files, nor
of any other session; a read-only system; only its working directory (and private tmpfs
mounts) writable; no network at all; with a root service, a uid of its own per session. Where
it does not (no bwrap, `sandbox="none"`), a kernel is a plain child process running as the
service's user: a development convenience, not a security boundary, and the backend says so
(`isolation`, shown by `/readyz`).

Either way: its own process group (signals reach what the code started), a scrubbed
environment, rlimits, nice 10, and what it prints outside the protocol kept in memory (the
last 64 KiB), never in a host file it could fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import psutil

from ..files import give_tree
from .base import (
    SANDBOX_RUNTIME,
    SANDBOX_WORKDIR,
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
from .bwrap import (
    BOOT_DIR,
    KERNEL_CAPS,
    MPL_CACHE,
    TEMPLATE_CAPS,
    Bind,
    Bubblewrap,
    SandboxUids,
    data_fd,
    find_bwrap,
    host_path,
    interpreter_paths,
    isolation_report,
    passwd_files,
)
from .launch import (
    FORKSERVER_BOOT,
    KERNEL_BOOT,
    SANDBOX_SCRATCH,
    TEMPLATE_SOCKET,
    OutputTail,
    boot_env,
    describe_exit,
    kernel_env,
    rlimits_for,
    template_env,
    tree_pss,
)
from .local_forked import TEMPLATE_SOCKET as TEMPLATE_SOCKET_KT
from .local_forked import KernelTemplate

log = logging.getLogger(__name__)


class LocalKernel(KernelProcess):
    """A kernel (or a fork-server template) started by `LocalBackend._launch`. In a sandbox,
    `init_pid` is the host pid of the sandbox's PID 1, and `runtime_dir` is reached through
    it (nothing of the sandbox is on the host's disk)."""

    backend_name = "local"

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        workdir: Path,
        runtime_dir: Path,
        info: dict,
        registry: set[LocalKernel],
        output: OutputTail,
        *,
        init_pid: int | None = None,
        file_owner: tuple[int, int] | None = None,
    ) -> None:
        self._proc = proc
        self._registry = registry
        self._output = output
        self.workdir = workdir
        self.runtime_dir = runtime_dir
        self.connection_info = info
        self.file_owner = file_owner
        self.init_pid = init_pid
        self._init = None  # a pidfd: signals cannot reach a process that reused the pid
        if init_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                self._init = os.pidfd_open(init_pid)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _exit_info(self, code: int | None) -> ExitInfo:
        # bwrap ends with 128 + N when the sandbox's process was killed by signal N.
        if self.init_pid is not None and code is not None and 128 < code < 128 + 65:
            code = 128 - code
        return describe_exit(code)

    async def poll(self) -> ExitInfo | None:
        code = self._proc.returncode
        return None if code is None else self._exit_info(code)

    async def wait(self) -> ExitInfo:
        return self._exit_info(await self._proc.wait())

    def _init_alive(self) -> bool:
        if self._init is None:
            return False
        try:
            signal.pidfd_send_signal(self._init, 0)
            return True
        except ProcessLookupError:
            return False

    async def send_signal(self, signum: int) -> None:
        if self._proc.returncode is not None:
            return
        # The whole process group, as a terminal's Ctrl-C would: children stop too. In a
        # sandbox that is its PID 1's group (bwrap --new-session), which the kernel is in;
        # PID 1 itself ignores what it has no handler for.
        group = self.init_pid if self.init_pid is not None else self._proc.pid
        if self.init_pid is not None and not self._init_alive():
            return  # gone: its group id may belong to someone else by now
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signum)

    async def kill(self) -> None:
        if self.init_pid is not None:
            # Its PID 1 gone, the kernel sees every process of its namespace killed.
            if self._init_alive():
                signal.pidfd_send_signal(self._init, signal.SIGKILL)
        else:
            # Children that left the process group (setsid) are found through the tree.
            try:
                descendants = psutil.Process(self._proc.pid).children(recursive=True)
            except psutil.Error:
                descendants = []
            await self.send_signal(signal.SIGKILL)
            for child in descendants:
                with contextlib.suppress(psutil.Error):
                    child.kill()
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        await self._proc.wait()

    async def cleanup(self) -> None:
        self._registry.discard(self)
        self._output.close()
        if self._init is not None:
            os.close(self._init)
            self._init = None
        if self.init_pid is None:  # a sandbox's runtime directory went with it
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def log_tail(self, max_chars: int = 2000) -> str:
        return self._output.tail(max_chars)

    def memory_pss(self) -> int | None:
        # A template's too: with the children it forked ahead of demand (they share its pages)
        return tree_pss(self._proc.pid)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pid": self.pid, "init_pid": self.init_pid}


class LocalTemplate(LocalKernel):
    """A fork-server template: a kernel process, plus the scratch directory of its runs."""

    scratch: Path | None = None

    async def cleanup(self) -> None:
        await super().cleanup()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


class LocalBackend(KernelBackend):
    """Kernels as child processes, each in a bwrap sandbox where the machine allows it.

    `sandbox`: "auto" (bwrap when it works here, else plain processes, said loudly), "bwrap"
    (refuse to start without it), "none" (plain processes)."""

    name = "local"

    def __init__(
        self,
        config: KernelConfig | None = None,
        *,
        runtime_root: Path | None = None,
        private_network: bool = True,
        python: str = sys.executable,
        sandbox: Literal["auto", "bwrap", "none"] = "auto",
        kernels: Literal["auto", "forked", "spawned"] = "auto",
    ) -> None:
        super().__init__(config)
        self.python = python
        self.private_network = private_network
        as_root = os.geteuid() == 0
        bwrap = find_bwrap() if sandbox != "none" else None
        self._isolation, sandboxed, self.runs_isolated = isolation_report(sandbox, bwrap, as_root)
        for missing in self._isolation["missing"]:
            log.warning("local backend, weaker isolation: %s", missing)
        self.bwrap = Bubblewrap(bwrap, as_root) if sandboxed and bwrap else None
        self.uids = SandboxUids() if self.bwrap is not None and as_root else None
        # Socket paths must stay short (108 bytes for a unix socket), hence /tmp.
        self.runtime_root = runtime_root or Path(tempfile.mkdtemp(prefix="kernelbox-"))
        self.runtime_root.mkdir(parents=True, exist_ok=True)
        # One matplotlib cache for all kernels, so the font cache is built once: in a sandbox
        # a read-only copy (each kernel copies it), else a directory all of them write.
        self._mpl_dir = self.runtime_root / "matplotlib"
        self._mpl_dir.mkdir(exist_ok=True)
        self._mpl_task: asyncio.Task[bool] | None = None
        self._kernels: set[KernelProcess] = set()
        # Forked kernels need what only a root service with bwrap has (a uid per session, and
        # open_tree to hand a working directory into another mount namespace).
        can_fork = self.bwrap is not None and self.uids is not None
        if kernels == "forked" and not can_fork:
            raise RuntimeError("KERNELBOX_LOCAL_KERNELS=forked needs a root service with bwrap")
        self.forks_kernels = can_fork and kernels != "spawned"
        self.template = KernelTemplate(self)

    @classmethod
    def from_settings(cls, config: KernelConfig, settings: Any) -> LocalBackend:
        return cls(
            config,
            python=settings.kernel_python or sys.executable,
            sandbox=settings.local_sandbox,
            kernels=settings.local_kernels,
        )

    @property
    def scratch_is_private(self) -> bool:
        return self.bwrap is not None  # without a sandbox, /tmp and /mnt are the host's

    @property
    def isolation(self) -> dict:
        return self._isolation

    async def start(self, workdir: Path, env: dict[str, str] | None = None) -> KernelProcess:
        if self.forks_kernels:
            # Not waiting for a template that is starting (its imports take longer than a
            # spawn): this kernel is spawned meanwhile.
            template = await self.template.ready(wait=False)
            if template is not None:
                try:
                    return await self._fork(template, workdir, env or {})
                except (OSError, RuntimeError, TimeoutError) as exc:
                    # A dead template is replaced on the next start; this kernel is spawned.
                    log.warning("kernel not forked (%s); spawning it", exc, exc_info=True)
        return await self._spawn(workdir, env)

    async def _fork(self, template: LocalKernel, workdir: Path, extra: dict[str, str]):
        """A kernel forked from the template, with what a spawned one gets from its bwrap
        command line and environment (see local_forked.py)."""
        assert self.uids is not None
        cfg = self.config
        uid = gid = self.uids.take(workdir)
        if os.lstat(workdir).st_uid != uid:  # first seen: make what is there its own
            await asyncio.to_thread(give_tree, workdir, (uid, gid))
        inside = Path(SANDBOX_RUNTIME)
        info = new_connection_info(inside)
        kenv = kernel_env(cfg, Path(SANDBOX_WORKDIR), inside, extra)
        kenv.update({k: v for k, v in SANDBOX_SCRATCH.items() if k not in cfg.env | extra})
        kenv["KERNELBOX_RLIMITS"] = json.dumps(rlimits_for(cfg.limits, per_sandbox=True))
        kenv.update(boot_env(cfg))
        kenv["KERNELBOX_UNSHARE_NET"] = "1"  # bwrap's --unshare-net, made by the kernel
        kenv["KERNELBOX_RUN_AS"] = f"{uid}:{gid}"
        files = {f"{inside}/connection.json": json.dumps(info)}
        files.update({k: v.decode() for k, v in passwd_files(uid, gid).items()})
        request = {
            "argv": ["-f", f"{inside}/connection.json"],
            "env": kenv,
            "files": files,
            "run_as": f"{uid}:{gid}",
        }
        kernel = await self.template.fork(
            template, workdir=workdir, request=request, info=info, file_owner=(uid, gid)
        )
        self._kernels.add(kernel)
        return kernel

    async def launch_kernel_template(self) -> LocalKernel:
        """The kernel template (kernel_template_boot.py) in a sandbox like a kernel's; root
        with CAP_SETUID, CAP_SETGID and CAP_SYS_ADMIN, which each fork drops (see there)."""
        empty = Path(tempfile.mkdtemp(prefix="kt-", dir=self.runtime_root))
        env = kernel_env(self.config, Path("/tmp"), Path("/tmp"), {})
        env.update({k: v for k, v in SANDBOX_SCRATCH.items() if k not in self.config.env})
        env["HOME"] = "/tmp"
        argv = [self.python, f"{BOOT_DIR}/kernel_template_boot.py"]
        argv += ["--socket", f"{SANDBOX_RUNTIME}/{TEMPLATE_SOCKET_KT}"]
        # `empty` only gives each fork a mountpoint for its working directory.
        handle = await self._launch(
            argv,
            env,
            binds=[Bind(empty, SANDBOX_WORKDIR)],
            template=True,
            run_as=False,
            kind=LocalTemplate,
        )
        assert isinstance(handle, LocalTemplate)
        handle.scratch = empty
        return handle

    async def _spawn(self, workdir: Path, env: dict[str, str] | None = None) -> LocalKernel:
        cfg = self.config
        extra = env or {}
        if self.bwrap is None:
            runtime_dir = Path(tempfile.mkdtemp(prefix="k-", dir=self.runtime_root))
            (runtime_dir / "tmp").mkdir()
            info = new_connection_info(runtime_dir)
            write_connection_file(runtime_dir / "connection.json", info)
            kenv = kernel_env(cfg, workdir, runtime_dir, extra)
            kenv.setdefault("MPLCONFIGDIR", str(self._mpl_dir))
            kenv["KERNELBOX_RLIMITS"] = json.dumps(rlimits_for(cfg.limits))
            kenv.update(boot_env(cfg))
            if self.private_network:
                kenv["KERNELBOX_UNSHARE_NET"] = "1"
            argv = [self.python, str(KERNEL_BOOT), "-f", str(runtime_dir / "connection.json")]
            return await self._launch(
                argv, kenv, runtime_dir=runtime_dir, workdir=workdir, info=info
            )
        inside = Path(SANDBOX_RUNTIME)
        info = new_connection_info(inside)  # the kernel's view; the service's is set by launch
        kenv = kernel_env(cfg, Path(SANDBOX_WORKDIR), inside, extra)
        kenv.update({k: v for k, v in SANDBOX_SCRATCH.items() if k not in cfg.env | extra})
        kenv["KERNELBOX_RLIMITS"] = json.dumps(rlimits_for(cfg.limits, per_sandbox=True))
        kenv.update(boot_env(cfg))
        argv = [self.python, f"{BOOT_DIR}/kernel_boot.py", "-f", f"{inside}/connection.json"]
        files = {f"{inside}/connection.json": json.dumps(info).encode()}
        return await self._launch(argv, kenv, workdir=workdir, files=files, info=info)

    async def launch_template(self, options: TemplateOptions) -> LocalTemplate:
        # Launched like a kernel: close() kills it and everything it forked.
        runtime_dir = Path(tempfile.mkdtemp(prefix="fs-", dir=self.runtime_root))
        slots = ["--slots", str(options.slots), "--prefork", str(options.prefork)]
        env = kernel_env(self.config, runtime_dir, runtime_dir, {})
        for key in ("IPYTHONDIR", "PYTHONUNBUFFERED"):  # kernel settings, not a script's
            env.pop(key, None)
        if self.bwrap is not None:
            handle = await self._launch_sandboxed_template(options, runtime_dir, slots, env)
        else:
            handle = await self._launch_plain_template(options, runtime_dir, slots, env)
        handle.connection_info = template_connection_info(handle.runtime_dir / TEMPLATE_SOCKET)
        return handle

    async def _launch_sandboxed_template(
        self, options: TemplateOptions, runtime_dir: Path, slots: list[str], env: dict[str, str]
    ) -> LocalTemplate:
        # In a sandbox like a kernel's; its runs' directories on its private /tmp, each run in
        # namespaces of its own where the machine allows. `runtime_dir` stays empty: a root
        # service's template has a uid of its own while it exists.
        scratch = {key: SANDBOX_SCRATCH[key] for key in ("TMPDIR", "MPLCONFIGDIR")}
        env.update(scratch, HOME="/tmp", **template_env(options, self.config))
        lim = self.config.limits
        argv = [self.python, f"{BOOT_DIR}/forkserver_boot.py", *slots]
        argv += ["--socket", f"{SANDBOX_RUNTIME}/{TEMPLATE_SOCKET}", "--runs", "/tmp"]
        if self.runs_isolated:
            argv.append("--isolate")
            if lim.pids is not None:
                env["KERNELBOX_NPROC"] = str(lim.pids)
        handle = await self._launch(argv, env, owner=runtime_dir, template=True, kind=LocalTemplate)
        assert isinstance(handle, LocalTemplate)
        handle.scratch = runtime_dir
        return handle

    async def _launch_plain_template(
        self, options: TemplateOptions, runtime_dir: Path, slots: list[str], env: dict[str, str]
    ) -> LocalTemplate:
        runs = _scratch_dir() or runtime_dir / "runs"
        env.setdefault("MPLCONFIGDIR", str(self.runtime_root / "matplotlib"))
        env.update(template_env(options, self.config))
        if self.private_network:
            env["KERNELBOX_UNSHARE_NET"] = "1"
        socket = runtime_dir / TEMPLATE_SOCKET
        argv = [self.python, str(FORKSERVER_BOOT), "--socket", str(socket), "--runs", str(runs)]
        handle = await self._launch(
            [*argv, *slots], env, runtime_dir=runtime_dir, kind=LocalTemplate
        )
        assert isinstance(handle, LocalTemplate)
        handle.scratch = runs if runs.parent != runtime_dir else None
        return handle

    async def _launch(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        runtime_dir: Path | None = None,
        workdir: Path | None = None,
        owner: Path | None = None,
        files: dict[str, bytes] | None = None,
        info: dict | None = None,
        template: bool = False,
        kind: type[LocalKernel] = LocalKernel,
        binds: list[Bind] | None = None,
        run_as: bool = True,
    ) -> LocalKernel:
        """Start one process of ours (a kernel, or a fork server's template): its own process
        group, dying with the service, killed by `close`.

        Plain (no sandbox): `argv` names host paths; it runs in `workdir` (else `runtime_dir`,
        which it owns). In a sandbox: `argv` names the sandbox's paths; `workdir` is bound at
        SANDBOX_WORKDIR; `files` (path inside -> content) are read-only files in it; a root
        service gives it the uid of `owner` (default: `workdir`), which lasts as long as that
        directory; `template` keeps what a fork-server template needs to isolate its runs.
        `info` (the kernel's connection info) becomes `connection_info` with host paths."""
        if self.bwrap is None:
            assert runtime_dir is not None
            env = {**env, "KERNELBOX_PARENT_PID": str(os.getpid())}
            out_r, out_w = os.pipe()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=workdir or runtime_dir,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out_w,
                    stderr=out_w,
                    start_new_session=True,  # own process group: signals reach the kernel only
                )
            except BaseException:
                os.close(out_r)
                raise
            finally:
                os.close(out_w)
            kernel = kind(
                proc,
                workdir or runtime_dir,
                runtime_dir,
                info or {},
                self._kernels,
                OutputTail(out_r),
            )
        else:
            kernel = await self._launch_sandboxed(
                argv,
                env,
                workdir,
                owner or workdir,
                files or {},
                info,
                template,
                kind,
                binds or [],
                run_as,
            )
        self._kernels.add(kernel)
        return kernel

    async def _launch_sandboxed(
        self,
        argv: list[str],
        env: dict[str, str],
        workdir: Path | None,
        owner: Path | None,
        files: dict[str, bytes],
        info: dict | None,
        template: bool,
        kind: type[LocalKernel],
        extra_binds: list[Bind],
        run_as: bool,
    ) -> LocalKernel:
        assert self.bwrap is not None
        python_paths = await interpreter_paths(self.python)
        binds = [Bind(workdir, SANDBOX_WORKDIR, writable=True)] if workdir is not None else []
        binds += extra_binds
        env = dict(env)
        if await self._font_cache(python_paths):
            binds.append(Bind(self._mpl_dir, MPL_CACHE))
            env["KERNELBOX_MPL_CACHE"] = MPL_CACHE
        uid, gid = os.getuid(), os.getgid()
        file_owner = None
        if self.uids is not None and run_as:
            assert owner is not None, "a root service's sandbox needs a directory to own"
            uid = gid = self.uids.take(owner)
            env["KERNELBOX_RUN_AS"] = f"{uid}:{gid}"
            if workdir is not None:
                file_owner = (uid, gid)
                if os.lstat(workdir).st_uid != uid:  # first seen: make what is there its own
                    await asyncio.to_thread(give_tree, workdir, (uid, gid))
        fds = {path: data_fd(data) for path, data in {**passwd_files(uid, gid), **files}.items()}
        info_r, info_w = os.pipe()
        out_r, out_w = os.pipe()
        command = self.bwrap.command(
            argv,
            python_paths=python_paths,
            cwd=SANDBOX_WORKDIR if workdir is not None else "/tmp",
            binds=binds,
            data=fds,
            info_fd=info_w,
            caps=TEMPLATE_CAPS if template else KERNEL_CAPS,
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_w,
                stderr=out_w,
                pass_fds=[info_w, *fds.values()],
                start_new_session=True,
            )
        except BaseException:
            for fd in (info_r, out_r):
                os.close(fd)
            raise
        finally:
            for fd in (info_w, out_w, *fds.values()):
                os.close(fd)
        output = OutputTail(out_r)
        try:
            init_pid = await _sandbox_pid(info_r, self.config.start_timeout)
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            said = output.tail(2000)
            output.close()
            if isinstance(exc, Exception):
                raise RuntimeError(f"bwrap did not start the sandbox: {said or exc}") from exc
            raise
        runtime_dir = host_path(init_pid, SANDBOX_RUNTIME)
        host_info = connection_info_at(info, runtime_dir) if info is not None else {}
        return kind(
            proc,
            workdir if workdir is not None else runtime_dir,
            runtime_dir,
            host_info,
            self._kernels,
            output,
            init_pid=init_pid,
            file_owner=file_owner,
        )

    async def _font_cache(self, python_paths: tuple[str, ...]) -> bool:
        """matplotlib's font cache, built once per backend in a sandbox like a kernel's (so it
        names the fonts a kernel sees), read-only for every kernel after. False if it could not
        be built: each kernel then builds its own (a second of CPU at its start)."""
        task = self._mpl_task
        if task is None or (not task.done() and task.get_loop() is not asyncio.get_running_loop()):
            task = self._mpl_task = asyncio.ensure_future(self._build_font_cache(python_paths))
        return await asyncio.shield(task)

    async def _build_font_cache(self, python_paths: tuple[str, ...]) -> bool:
        assert self.bwrap is not None
        uid, gid = os.getuid(), os.getgid()
        fds = {path: data_fd(data) for path, data in passwd_files(uid, gid).items()}
        command = self.bwrap.command(
            [self.python, "-c", "import matplotlib.font_manager"],
            python_paths=python_paths,
            cwd="/tmp",
            binds=[Bind(self._mpl_dir, MPL_CACHE, writable=True)],
            data=fds,
            caps=(),
        )
        env = {"PATH": "/usr/bin:/bin", "MPLCONFIGDIR": MPL_CACHE, "HOME": "/tmp"}
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=list(fds.values()),
            )
        finally:
            for fd in fds.values():
                os.close(fd)
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            log.warning("matplotlib's font cache not built: %s", out.decode(errors="replace"))
            return False
        return True

    async def close(self) -> None:
        for kernel in list(self._kernels):
            await kernel.kill()
            await kernel.cleanup()
        if self._mpl_task is not None and not self._mpl_task.done():
            self._mpl_task.cancel()
        shutil.rmtree(self.runtime_root, ignore_errors=True)


def _scratch_dir() -> Path | None:
    """A fresh 0700 directory on /dev/shm when that is a tmpfs, for the runs' working
    directories: creating and removing a directory there costs a twentieth of what it costs
    on a journaled disk (measured: 0.14 ms against 3 ms on ext4), and each run does both."""
    try:
        with open("/proc/self/mounts") as mounts:
            tmpfs = any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in mounts)
        if tmpfs:
            return Path(tempfile.mkdtemp(prefix="kernelbox-runs-", dir="/dev/shm"))
    except OSError:
        pass
    return None


async def _sandbox_pid(fd: int, timeout: float) -> int:
    """From bwrap's --info-fd: the host pid of the sandbox's PID 1 (bwrap writes it once the
    sandbox exists; EOF without it means bwrap gave up)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        data = b""
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(4096):
                data += chunk
                with contextlib.suppress(ValueError):
                    return int(json.loads(data)["child-pid"])
        raise RuntimeError("bwrap ended before the sandbox existed")
    finally:
        transport.close()
