"""Where a kernel runs: the backend interface.

Modelled on jupyter_client's kernel provisioners (launch, poll, wait, send_signal, kill,
cleanup), cut down to what the engine needs and made async end to end. A backend starts two
kinds of process, each returned as a `KernelProcess`, the handle the engine signals, kills and
watches:

- kernels (`start`), which the engine talks to over ZMQ with `connection_info`;
- fork-server templates (`launch_template`), which fork a child per stateless run and are
  reached on the one socket their `connection_info` names.

How to reach a process is the backend's business and stays inside `connection_info`: today
its transport is IPC (unix sockets in a per-process runtime directory, so a kernel needs no
network at all), and the layers above ask `socket_path` for an address instead of building
one. A handle can be described as JSON (`describe`) and, where the backend's processes outlive
the service (containers), found again from that description (`attach`).
"""

from __future__ import annotations

import abc
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Socket names are "<runtime_dir>/k-<port>" for ipc transport.
_PORTS = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}

# Inside every sandbox (a Docker container, a local bwrap sandbox), the same layout: the session
# working directory (also cwd and HOME), and the runtime directory with the kernel's sockets
# and its connection file.
SANDBOX_WORKDIR = "/home/sandbox/work"
SANDBOX_RUNTIME = "/run/kernelbox"


@dataclass(frozen=True)
class Limits:
    """Resource limits for one kernel. `None` means "not limited by us"."""

    memory_bytes: int | None = 2 * 1024**3
    cpus: float | None = 1.0
    pids: int | None = 256
    file_size_bytes: int | None = 1024**3
    open_files: int | None = 1024
    # The working directory's size, on both backends watched by the session (quota.py).
    disk_bytes: int | None = 1024**3
    # Niceness added to kernels, so that user code never starves the service (HTTP, health
    # checks, other sessions' messages) of CPU.
    nice: int | None = 10


@dataclass(frozen=True)
class KernelConfig:
    """What every kernel of a backend is started with (besides its own directories)."""

    limits: Limits = field(default_factory=Limits)
    # Cap on text the kernel sends per stream per execution before it keeps only the tail.
    output_cap_chars: int = 200_000
    # Cap on one image (decoded bytes) that a display may carry.
    image_cap_bytes: int = 8 * 1024**2
    # Largest message the host takes from a kernel (a larger one drops the connection, and the
    # kernel is replaced); also bounds what the host holds per message before checking it.
    max_message_bytes: int = 16 * 1024**2
    # Extra environment for the kernel (never the service's own environment).
    env: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 60.0


@dataclass(frozen=True)
class ExitInfo:
    """How a kernel ended, in words fit for a model and an operator."""

    exit_code: int | None
    reason: str  # e.g. "out of memory", "killed by signal 9 (SIGKILL)", "exited with code 1"
    oom: bool = False


@dataclass(frozen=True)
class TemplateOptions:
    """What a backend starts a fork-server template with (see sandbox/forkserver.py)."""

    #: concurrent runs the template serves (Docker: the size of its uid range)
    slots: int = 64
    #: children forked ahead of demand
    prefork: int = 8
    preload: tuple[str, ...] = ("numpy", "pandas", "matplotlib", "matplotlib.pyplot")
    #: bytes of fetched files returned per run at most
    fetch_cap_bytes: int = 64 * 1024**2
    #: the template's heap on transparent huge pages (cheaper forks)
    hugepages: bool = True
    #: whether it also forks kernels (one-shot ones, whose working directories the backend
    #: says where: `KernelBackend.oneshot_dir`), not only runs of code
    kernels: bool = False


class CannotAttach(NotImplementedError):
    """This backend's processes cannot be found again from a description."""


class KernelProcess(abc.ABC):
    """One running kernel (or fork-server template), wherever it runs."""

    #: the registry name of the backend that started it
    backend_name: str = "abstract"

    #: host-side path of the session working directory the kernel runs in
    workdir: Path
    #: host-side directory holding the kernel's sockets and connection file
    runtime_dir: Path
    #: what jupyter_client needs to connect (transport "ipc", host-side socket paths)
    connection_info: dict
    #: (uid, gid) that files the service writes into the working directory must belong to, so
    #: the kernel can change them; None when the kernel runs as the service's own user
    file_owner: tuple[int, int] | None = None

    @abc.abstractmethod
    async def poll(self) -> ExitInfo | None:
        """`None` while the kernel process is alive, else how it ended."""

    @abc.abstractmethod
    async def wait(self) -> ExitInfo:
        """Return when the kernel process has ended."""

    @abc.abstractmethod
    async def send_signal(self, signum: int) -> None:
        """Deliver a signal to the kernel (and what it started); a dead kernel is a no-op."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Kill the kernel and everything it started, now."""

    @abc.abstractmethod
    async def cleanup(self) -> None:
        """Release what the kernel held (sockets, container); call after `kill`."""

    @abc.abstractmethod
    def log_tail(self, max_chars: int = 2000) -> str:
        """The end of what the kernel process printed outside the protocol (start-up errors)."""

    def memory_pss(self) -> int | None:
        """Proportional set size of the process and what it started, where measurable."""
        return None

    def describe(self) -> dict[str, Any]:
        """What `KernelBackend.attach` needs to find this process again, as JSON-able data:
        the backend's name, the process's ids, its connection info and its working directory."""
        return {
            "backend": self.backend_name,
            "connection_info": dict(self.connection_info),
            "workdir": str(self.workdir),
            "runtime_dir": str(self.runtime_dir),
        }


class KernelBackend(abc.ABC):
    """Starts kernels. One instance per service; it owns every kernel it started."""

    name: str = "abstract"
    #: the `file_owner` of this backend's kernels, where all have the same
    file_owner: tuple[int, int] | None = None
    #: whether a throwaway kernel is forked from a warm template (milliseconds each, little
    #: memory): then a throwaway kernel (/run_jupyter) is started fresh for its request, not
    #: taken from the pool
    forks_kernels: bool = False
    #: where a throwaway kernel's working directory must be made (a plain directory, in a
    #: directory of its own below this one): the only place the backend's forked kernels can
    #: reach, and how `start` tells a throwaway kernel (forked) from a session's; None: the
    #: usual place
    oneshot_dir: Path | None = None

    def __init__(self, config: KernelConfig | None = None) -> None:
        self.config = config or KernelConfig()

    @classmethod
    def from_settings(cls, config: KernelConfig, settings: Any) -> KernelBackend:
        """This backend as the service configures it: `settings` is the service's Settings,
        of which each backend reads only its own fields (see registry.py)."""
        return cls(config)

    @abc.abstractmethod
    async def start(self, workdir: Path, env: dict[str, str] | None = None) -> KernelProcess:
        """Launch a kernel whose working directory is `workdir` (created by the caller; under
        `oneshot_dir` for a throwaway kernel).

        Returns once the process exists; the engine waits for it to answer.
        """

    async def launch_template(self, options: TemplateOptions) -> KernelProcess:
        """Start one fork-server template (sandbox/forkserver_boot.py) in this backend's
        sandbox; its `connection_info` names the socket it serves runs on (`socket_path`).
        Registered like a kernel: `close` removes it."""
        raise NotImplementedError(f"the {self.name} backend has no fork server")

    async def attach(self, description: dict[str, Any]) -> KernelProcess:
        """The process that `KernelProcess.describe` described, running still."""
        raise CannotAttach(
            f"the {self.name} backend cannot re-attach to a kernel: its kernels end with the "
            "service that started them"
        )

    async def detach(self, proc: KernelProcess) -> bool:
        """Let `proc` outlive this service, for the next one to `attach` to; whether it
        does. Here it cannot (its kernels end with the service): it is stopped."""
        try:
            await proc.kill()
        finally:
            await proc.cleanup()
        return False

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Remove everything this backend started that is still around."""

    @property
    def scratch_is_private(self) -> bool:
        """Whether a kernel's /tmp, /mnt and /data are its sandbox's own, never the host's
        (SandboxFusion's absolute paths are allowed only then)."""
        return True

    @property
    def isolation(self) -> dict:
        """What separates this backend's kernels from the service and from each other, as
        `/readyz` reports it; `weak` is true where a piece is missing."""
        return {"backend": self.name, "weak": False}


def new_connection_info(runtime_dir: Path) -> dict:
    """Connection info for an IPC kernel whose sockets live in `runtime_dir`."""
    return {
        "transport": "ipc",
        "ip": str(runtime_dir / "k"),
        **_PORTS,
        "key": secrets.token_hex(32),
        "signature_scheme": "hmac-sha256",
        "kernel_name": "",
    }


def template_connection_info(socket: Path) -> dict:
    """Connection info for a fork-server template serving runs on the unix socket `socket`."""
    return {"transport": "ipc", "ip": str(socket)}


def socket_path(info: dict, channel: str | None = None) -> str:
    """The host-side unix socket to connect to: a kernel's `channel` ("shell", "iopub", ...)
    or, without one, a fork-server template's socket. The one place that knows how IPC
    connection info names its sockets."""
    if info.get("transport") != "ipc":
        raise ValueError(f"transport {info.get('transport')!r} is not supported here")
    return f"{info['ip']}-{info[f'{channel}_port']}" if channel else str(info["ip"])


def connection_info_at(info: dict, runtime_dir: str | Path) -> dict:
    """The same connection info, with its sockets in `runtime_dir`: how the other side of a
    sandbox (the kernel inside it, or the service outside) names the same directory."""
    return {**info, "ip": str(Path(runtime_dir) / "k")}


def write_connection_file(path: Path, info: dict) -> None:
    path.write_text(json.dumps(info))
    path.chmod(0o600)
