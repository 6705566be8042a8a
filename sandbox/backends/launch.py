"""What every backend launches kernels and fork-server templates with: their environment,
their rlimits, how an exit reads, and what a process tree costs in memory.

The environment of a sandboxed process is built from nothing (no secret of the service leaks
in); each backend then puts its own paths in place of the host's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import psutil

from .base import ExitInfo, KernelConfig, Limits, TemplateOptions

_SANDBOX = Path(__file__).resolve().parent.parent
#: the kernel's entry file (the images hold a copy, next to the fork server's)
KERNEL_BOOT = _SANDBOX / "kernel_boot.py"
#: a fork-server template's entry file
FORKSERVER_BOOT = _SANDBOX / "forkserver_boot.py"
#: the socket a template serves runs on, in its runtime directory
TEMPLATE_SOCKET = "fs.sock"

# Thread pools in BLAS/OpenMP would otherwise size themselves to every core of the host.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
)
# Where a sandboxed process keeps its scratch files: its private /tmp, never the host's disk.
SANDBOX_SCRATCH = {
    "TMPDIR": "/tmp",
    "IPYTHONDIR": "/tmp/ipython",
    "MPLCONFIGDIR": "/tmp/matplotlib",
}


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


def rlimits_for(limits: Limits, per_sandbox: bool = False) -> dict[str, int]:
    """The rlimits of a kernel. RLIMIT_NPROC counts every process and thread of a uid in a
    user namespace: only a sandbox (a uid or a user namespace of its own) can have it, or it
    would count the service and every other kernel too."""
    spec = {
        "AS": limits.memory_bytes,
        "FSIZE": limits.file_size_bytes,
        "NOFILE": limits.open_files,
        "CORE": 0,
        "NPROC": limits.pids if per_sandbox else None,
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


def template_env(options: TemplateOptions, config: KernelConfig) -> dict[str, str]:
    """What forkserver_boot.py reads from its environment, on every backend."""
    lim = config.limits
    env = {
        "MPLBACKEND": "Agg",  # plots render to files; nothing to show them on
        "KERNELBOX_RLIMITS": json.dumps(rlimits_for(lim)),
        "KERNELBOX_PRELOAD": ",".join(options.preload),
        "KERNELBOX_FETCH_CAP": str(options.fetch_cap_bytes),
    }
    if lim.nice:
        env["KERNELBOX_NICE"] = str(lim.nice)
    if options.hugepages:
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
        env["KERNELBOX_HUGEPAGES"] = "1"
    return env


class OutputTail:
    """What a kernel process prints outside the protocol (start-up errors): read from a pipe
    as it comes, only the last `limit` bytes kept."""

    def __init__(self, fd: int, limit: int = 64 * 1024) -> None:
        self.fd, self.limit = fd, limit
        self.data = bytearray()
        self.loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self.drain)

    def drain(self) -> None:
        for _ in range(16):  # bounded per wake-up: a flood must not hold the event loop
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self.close()
                return
            self.data += chunk
            del self.data[: -self.limit]

    def tail(self, max_chars: int) -> str:
        if self.fd >= 0:
            self.drain()  # what arrived since the last wake-up (a death's last words)
        return self.data[-max_chars:].decode(errors="replace")

    def close(self) -> None:
        if self.fd >= 0:
            if not self.loop.is_closed():
                self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
