"""How the Docker engine runs kernels: the OCI runtime, runc (Docker's default) or gVisor's
runsc, and the user-namespace remapping of ids, both as `docker info` tells.

Under runc a kernel's system calls go to the host's Linux kernel, filtered by seccomp and
confined by namespaces and cgroups. Under runsc (gVisor) they go to the Sentry, a kernel in user
space, one per container: the host's kernel sees only the Sentry's own narrow set of calls, so
a bug in Linux reachable from code is much harder to use. The price is start-up time, a slower
system call path and memory (see bench/isolation_docker.py).

A runtime's arguments are the engine's (`runtimeArgs` in /etc/docker/daemon.json, per runtime,
never per container), so the backend cannot pass them; it checks them at start (`check`) and
says what to put in daemon.json when something is missing. Kernels need two of runsc's:

  --network=none     Docker's `network_mode: none` gives a container no network namespace that
                     runsc accepts ("cannot run with network enabled in root network
                     namespace"); with this flag the sandbox has a loopback interface and
                     nothing else.
  --host-uds=create  the kernel binds its ZMQ sockets (a fork-server template its own socket) in
                     the bind-mounted runtime directory, where the service connects to them
                     from the host. Without it they exist inside the sandbox only and the kernel
                     is never reached. `all` (= open + create) works too; `open` (connecting
                     from the sandbox to host sockets) is not needed.

Processes. Under runsc the container's pids cgroup counts the Sentry's host threads and its
ptrace stubs (about 80 for an idle kernel, and up to ~40 per process of the code when they all
run), not the code's processes, and reaching it ends the whole sandbox (the Sentry cannot
create a thread). So the code's limit is `RLIMIT_NPROC`, which the Sentry enforces per sandbox
(runc cannot: there it counts every process of the uid on the host), and the cgroup keeps a
wider bound that protects the host's pid space (`host_pids`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: what kernels need in a runsc runtime's runtimeArgs
RUNSC_ARGS = ("--network=none", "--host-uds=create")
#: host tasks (Sentry threads and stubs) allowed per process of the code, under runsc
RUNSC_TASKS_PER_PROCESS = 16
#: and what the Sentry needs at rest
RUNSC_TASKS_BASE = 256


@dataclass(frozen=True)
class Runtime:
    """The runtime kernels run under, as the engine describes it."""

    name: str
    path: str
    args: tuple[str, ...]

    @property
    def gvisor(self) -> bool:
        return Path(self.path).name == "runsc" or self.name == "runsc"

    def host_pids(self, pids: int) -> int:
        """The container's pids cgroup limit for a kernel that may run `pids` processes."""
        if not self.gvisor:
            return pids
        return RUNSC_TASKS_BASE + RUNSC_TASKS_PER_PROCESS * pids


def _flag(args: tuple[str, ...], name: str) -> str | None:
    """The value of runsc flag `name` in `args` (Go flag syntax: -f=v, --f=v, -f v), the last
    one winning as in Go; None when absent."""
    value = None
    for i, arg in enumerate(args):
        flag, eq, rest = arg.lstrip("-").partition("=")
        if arg.startswith("-") and flag == name:
            value = rest if eq else (args[i + 1] if i + 1 < len(args) else "")
    return value


def missing_args(runtime: Runtime) -> list[str]:
    """What a runsc runtime lacks for kernels (empty for other runtimes)."""
    if not runtime.gvisor:
        return []
    missing = []
    if _flag(runtime.args, "network") != "none":
        missing.append("--network=none")
    uds = _flag(runtime.args, "host-uds")
    legacy = _flag(runtime.args, "fsgofer-host-uds")  # deprecated spelling of "all"
    if uds not in ("create", "all") and legacy not in ("", "true", "1"):
        missing.append("--host-uds=create")
    return missing


def _daemon_json(name: str, path: str, args: list[str]) -> str:
    spec: dict[str, Any] = {"path": path}
    if args:
        spec["runtimeArgs"] = args
    return '"runtimes": ' + json.dumps({name: spec})


_RELOAD = "then reload the engine's runtimes without a restart: sudo kill -HUP $(pidof dockerd)"


def check(info: dict[str, Any], name: str | None) -> Runtime:
    """The runtime `name` (None: the engine's default) from `docker info`, or a RuntimeError
    that says what to put in /etc/docker/daemon.json."""
    runtimes: dict[str, dict] = info.get("Runtimes") or {}
    wanted = name or info.get("DefaultRuntime") or "runc"
    spec = runtimes.get(wanted)
    if spec is None:
        example = "/usr/bin/runsc" if wanted == "runsc" else f"/path/to/{wanted}"
        args = list(RUNSC_ARGS) if wanted == "runsc" else []
        raise RuntimeError(
            f"the Docker engine has no runtime {wanted!r} (it has: {', '.join(sorted(runtimes))}). "
            f"Register it in /etc/docker/daemon.json, keeping the other keys: "
            f"{_daemon_json(wanted, example, args)}; {_RELOAD}"
            + ("; runsc is Debian's package `runsc` (gVisor)" if wanted == "runsc" else "")
        )
    runtime = Runtime(wanted, spec.get("path") or wanted, tuple(spec.get("runtimeArgs") or ()))
    missing = missing_args(runtime)
    if missing:
        args = [*runtime.args, *missing]
        raise RuntimeError(
            f"the Docker runtime {wanted!r} is gVisor (runsc) without {' '.join(missing)}, which "
            f"kernels need (--network=none: runsc refuses Docker's network mode 'none' "
            f"otherwise; --host-uds=create: the kernel binds its sockets in a bind-mounted "
            f"directory for the service to reach). Its runtimeArgs are {list(runtime.args)}; "
            f"in /etc/docker/daemon.json give it {_daemon_json(wanted, runtime.path, args)}; "
            f"{_RELOAD}"
        )
    return runtime


def userns_shift(info: dict[str, Any], own: tuple[int, int] | None = None) -> tuple[int, int]:
    """What to add to a container's uid and gid to get the ids this process sees for them,
    under the engine's `userns-remap` (the engine then keeps its images in
    DockerRootDir/<uid>.<gid>, the host ids of a container's 0:0); (0, 0) without it. A
    service in a container remapped alike (`own`: where its own 0:0 is on the host, from its
    uid_map) shares the kernels' ids: nothing to add."""
    if not any("name=userns" in option for option in info.get("SecurityOptions") or ()):
        return 0, 0
    own = own or own_host_ids()
    root = str(info.get("DockerRootDir") or "")
    found = re.fullmatch(r"(\d+)\.(\d+)", Path(root).name)
    if found is None:
        raise RuntimeError(
            f"the Docker engine remaps user namespaces, but its root directory {root!r} does "
            "not say to which ids (expected .../<uid>.<gid>)"
        )
    return int(found[1]) - own[0], int(found[2]) - own[1]


def own_host_ids() -> tuple[int, int]:
    """The host's uid and gid for this process's 0:0 (not 0:0 in a remapped container)."""
    found = []
    for kind in ("uid", "gid"):
        with open(f"/proc/self/{kind}_map") as f:
            for inside, outside, _count in map(str.split, f):
                if inside == "0":
                    found.append(int(outside))
                    break
            else:
                found.append(0)
    return found[0], found[1]
