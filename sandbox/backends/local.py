"""The local backend: ipykernel as a child process of the service.

A development convenience, not a security boundary (see README, "What the local backend
isolates"): the kernel runs as the service's user, in its own process group and working
directory, with a scrubbed environment, rlimits, and a private network namespace where the
OS allows one.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import psutil

from .base import (
    ExitInfo,
    KernelBackend,
    KernelConfig,
    KernelProcess,
    Limits,
    new_connection_info,
    write_connection_file,
)

BOOT_SCRIPT = Path(__file__).resolve().parent.parent / "kernel_boot.py"

# Thread pools in BLAS/OpenMP would otherwise size themselves to every core of the host.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
)


def describe_exit(code: int | None) -> ExitInfo:
    if code is None:
        return ExitInfo(None, "ended for an unknown reason")
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return ExitInfo(code, f"killed by signal {-code} ({name})")
    return ExitInfo(code, f"exited with code {code}")


def rlimits_for(limits: Limits) -> dict[str, int]:
    # No RLIMIT_NPROC: it counts every process and thread of the *user*, so on a shared user
    # it would starve the other kernels; the Docker backend limits pids per container instead.
    spec = {
        "AS": limits.memory_bytes,
        "FSIZE": limits.file_size_bytes,
        "NOFILE": limits.open_files,
        "CORE": 0,
    }
    return {k: int(v) for k, v in spec.items() if v is not None}


def tree_pss(pid: int) -> int | None:
    """Proportional set size of a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        return sum(p.memory_full_info().pss for p in [root, *root.children(recursive=True)])
    except (psutil.Error, AttributeError):
        return None


def boot_env(config: KernelConfig) -> dict[str, str]:
    """What kernel_boot.py reads from its environment besides the rlimits."""
    env = {
        "KERNELBOX_OUTPUT_CAP": str(config.output_cap_chars),
        "KERNELBOX_IMAGE_CAP": str(config.image_cap_bytes),
    }
    if config.limits.nice:
        env["KERNELBOX_NICE"] = str(config.limits.nice)
    return env


def kernel_env(config: KernelConfig, workdir: Path, runtime_dir: Path, extra: dict[str, str]):
    """Build the kernel's environment from nothing: no secret of the service leaks in."""
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": str(runtime_dir / "tmp"),
        "PYTHONUNBUFFERED": "1",
        "IPYTHONDIR": str(runtime_dir / "ipython"),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        **{var: "1" for var in THREAD_VARS},
        **config.env,
        **extra,
    }
    return env


class LocalKernel(KernelProcess):
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        workdir: Path,
        runtime_dir: Path,
        info: dict,
        registry: set[LocalKernel],
    ) -> None:
        self._proc = proc
        self._registry = registry
        self.workdir = workdir
        self.runtime_dir = runtime_dir
        self.connection_info = info

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def poll(self) -> ExitInfo | None:
        code = self._proc.returncode
        return None if code is None else describe_exit(code)

    async def wait(self) -> ExitInfo:
        return describe_exit(await self._proc.wait())

    async def send_signal(self, signum: int) -> None:
        if self._proc.returncode is not None:
            return
        try:
            # The whole process group, as a terminal's Ctrl-C would: children stop too.
            os.killpg(self._proc.pid, signum)
        except ProcessLookupError:
            pass

    async def kill(self) -> None:
        # Children that left the process group (setsid) are found through the process tree.
        try:
            descendants = psutil.Process(self._proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        await self.send_signal(signal.SIGKILL)
        for child in descendants:
            try:
                child.kill()
            except psutil.Error:
                pass
        if self._proc.returncode is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass
        await self._proc.wait()

    async def cleanup(self) -> None:
        self._registry.discard(self)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def log_tail(self, max_chars: int = 2000) -> str:
        try:
            with open(self.runtime_dir / "kernel.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(f.tell() - max_chars, 0))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def memory_pss(self) -> int | None:
        try:
            return psutil.Process(self._proc.pid).memory_full_info().pss
        except (psutil.Error, AttributeError):
            return None


class LocalBackend(KernelBackend):
    name = "local"

    def __init__(
        self,
        config: KernelConfig | None = None,
        *,
        runtime_root: Path | None = None,
        private_network: bool = True,
        python: str = sys.executable,
    ) -> None:
        super().__init__(config)
        self.python = python
        self.private_network = private_network
        # Socket paths must stay short (108 bytes for a unix socket), hence /tmp.
        self.runtime_root = runtime_root or Path(tempfile.mkdtemp(prefix="kernelbox-"))
        self.runtime_root.mkdir(parents=True, exist_ok=True)
        # One matplotlib cache for all kernels, so the font cache is built once.
        self._mpl_dir = self.runtime_root / "matplotlib"
        self._mpl_dir.mkdir(exist_ok=True)
        self._kernels: set[LocalKernel] = set()

    async def start(self, workdir: Path, env: dict[str, str] | None = None) -> LocalKernel:
        runtime_dir = Path(tempfile.mkdtemp(prefix="k-", dir=self.runtime_root))
        (runtime_dir / "tmp").mkdir()
        info = new_connection_info(runtime_dir)
        conn_file = runtime_dir / "connection.json"
        write_connection_file(conn_file, info)
        cfg = self.config
        kenv = kernel_env(cfg, workdir, runtime_dir, env or {})
        kenv.setdefault("MPLCONFIGDIR", str(self._mpl_dir))
        kenv["KERNELBOX_RLIMITS"] = json.dumps(rlimits_for(cfg.limits))
        kenv.update(boot_env(cfg))
        if self.private_network:
            kenv["KERNELBOX_UNSHARE_NET"] = "1"
        argv = [self.python, str(BOOT_SCRIPT), "-f", str(conn_file)]
        return await self.launch(argv, workdir, runtime_dir, kenv, info=info)

    async def launch(
        self,
        argv: list[str],
        cwd: Path,
        runtime_dir: Path,
        env: dict[str, str],
        *,
        info: dict | None = None,
        kind: type[LocalKernel] = LocalKernel,
    ) -> LocalKernel:
        """Start one process of ours (a kernel, or a fork server's template): its own process
        group, output to `runtime_dir/kernel.log`, dying with the service, killed by `close`."""
        env = {**env, "KERNELBOX_PARENT_PID": str(os.getpid())}
        with open(runtime_dir / "kernel.log", "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # own process group: signals reach the kernel only
            )
        kernel = kind(proc, cwd, runtime_dir, info or {}, self._kernels)
        self._kernels.add(kernel)
        return kernel

    async def close(self) -> None:
        for kernel in list(self._kernels):
            await kernel.kill()
            await kernel.cleanup()
        shutil.rmtree(self.runtime_root, ignore_errors=True)
