"""What a kernel's (or a fork-server template's) container is made of: the arguments given to
docker-py's `containers.create`, and how a container's end reads."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docker.types import LogConfig, Mount, Ulimit

from .base import SANDBOX_RUNTIME, SANDBOX_WORKDIR, ExitInfo, KernelConfig, TemplateOptions
from .docker_owner import LABEL_CREATED, LABEL_KERNEL
from .docker_runtime import Runtime
from .launch import (
    FORKSERVER_BOOT,
    KERNEL_BOOT,
    TEMPLATE_SOCKET,
    boot_env,
    describe_exit,
    kernel_env,
    template_env,
)

log = logging.getLogger(__name__)

# Paths inside the container (see Dockerfile.kernel).
CONTAINER_WORKDIR = SANDBOX_WORKDIR
CONTAINER_RUNTIME = SANDBOX_RUNTIME
CONTAINER_PATH = "/opt/venv/bin:/usr/local/bin:/usr/bin:/bin"

# Docker: where the image keeps the entry file (next to kernel_boot.py, see Dockerfile.kernel).
CONTAINER_BOOT = "/opt/kernelbox/forkserver_boot.py"
SCRATCH_DIRS = ("/tmp", "/mnt", "/data")  # forkserver_boot.SCRATCH_ROOTS
CONTAINER_RUNS = "/tmp"  # the container's size-limited tmpfs, as SandboxFusion's /tmp/tmpXXXX
#: where a kernel template's one-shot kernels find their working directories (the backend's
#: `oneshot_dir`, bind-mounted)
CONTAINER_ONESHOT = "/home/sandbox/oneshot"


def oneshot_dir(runtime_root: Path, instance: str) -> Path:
    """Where the backend `instance` makes its throwaway kernels' working directories."""
    return runtime_root / f"o-{instance[:8]}"


#: memory a kernel template's container has per slot, on top of one kernel's limit: its
#: kernels share the container's cgroup, each bounded by its own address-space limit
KERNEL_SLOT_BYTES = 128 * 1024**2
# Same start as the kernel image's entrypoint (a writable copy of the prebuilt matplotlib
# cache), then the fork server instead of the kernel.
CONTAINER_ENTRY = (
    'mkdir -p "$MPLCONFIGDIR" && cp -R /opt/kernelbox/matplotlib/. "$MPLCONFIGDIR"/; '
    f'exec /opt/venv/bin/python {CONTAINER_BOOT} "$@"'
)
# Capabilities of the template in its container: SETUID and SETGID, to give each run a uid
# and gid of its own (setresuid, setresgid, setgroups). Nothing else: it kills a run's
# processes and removes its files acting as their owner (seteuid, forkserver_boot.acting_as),
# where CAP_KILL and CAP_DAC_OVERRIDE would add nothing that SETUID cannot reach anyway. A
# user namespace instead is out of reach: Docker's seccomp profile refuses unshare(CLONE_NEWUSER)
# without CAP_SYS_ADMIN. A run drops both for good (setresuid from root to another uid
# clears every capability) before its code starts.
TEMPLATE_CAPS = ["SETUID", "SETGID"]
# SysV IPC objects outlive processes and are shared by the container's runs: none at all
# (POSIX shared memory and semaphores, in /dev/shm, keep working and are swept).
LOOPBACK_V6 = {"net.ipv6.conf.lo.disable_ipv6": "0"}
NO_SYSV_IPC = {
    "kernel.shmmni": "1",
    "kernel.shmall": "0",
    "kernel.shmmax": "0",
    "kernel.msgmni": "0",
    "kernel.sem": "0 0 0 0",
    "fs.mqueue.queues_max": "0",
}


@dataclass(frozen=True)
class ContainerTarget:
    """What every container of one backend shares."""

    config: KernelConfig
    image: str
    instance: str
    #: the owner labels (docker_owner.owner_labels)
    labels: dict[str, str]
    #: uid:gid as the container sees them
    user: tuple[int, int]
    runtime: Runtime
    tmp_bytes: int
    log_bytes: int


def exit_info(code: int | None, oom: bool = False) -> ExitInfo:
    """How a container ended. tini exits with 128+N when the kernel was killed by signal N."""
    if oom:
        return ExitInfo(code, "out of memory", oom=True)
    if code is not None and 128 < code < 128 + 65:
        return describe_exit(128 - code)
    return describe_exit(code)


def warn_if_stale(image: str, labels: dict[str, str]) -> None:
    """An image built from other boot files than this checkout's runs other code."""
    built = labels.get("kernelbox.boot.sha256")
    try:
        here = hashlib.sha256(KERNEL_BOOT.read_bytes() + FORKSERVER_BOOT.read_bytes()).hexdigest()
    except OSError:
        return  # installed without the source next to it
    if built and built != here:
        log.warning(
            "image %s was built from other sandbox/kernel_boot.py or forkserver_boot.py "
            "files than these; rebuild it with scripts/build-kernel-image.sh",
            image,
        )


def kernel_container(
    target: ContainerTarget,
    kernel_id: str,
    workdir_on_host: Path | None,
    runtime_on_host: Path,
    extra: dict[str, str],
) -> dict[str, Any]:
    """docker-py `containers.create` arguments for one kernel: hardened as the module
    docstring of docker.py says. Mount sources are the engine's host paths."""
    cfg = target.config
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
        limits["pids_limit"] = target.runtime.host_pids(int(lim.pids))
        if target.runtime.gvisor:  # per sandbox there (see docker_runtime.py)
            ulimits.append(Ulimit(name="nproc", soft=int(lim.pids), hard=int(lim.pids)))
    uid, gid = target.user
    return {
        "image": target.image,
        "command": ["-f", f"{CONTAINER_RUNTIME}/connection.json"],
        "name": f"kernelbox-{target.instance[:8]}-{kernel_id}",
        "hostname": "sandbox",
        "labels": {
            **target.labels,
            LABEL_KERNEL: kernel_id,
            LABEL_CREATED: str(int(time.time())),
        },
        "environment": env,
        "user": f"{uid}:{gid}",
        "working_dir": CONTAINER_WORKDIR,
        "network_mode": "none",
        "read_only": True,
        # /mnt and /data as /tmp: scratch of the container's own (SandboxFusion's code writes
        # there); a template's runs each own what they make there, swept after the run.
        "tmpfs": {
            path: f"rw,nosuid,nodev,size={int(target.tmp_bytes)},mode=1777" for path in SCRATCH_DIRS
        },
        "mounts": [
            *(
                [Mount(CONTAINER_WORKDIR, str(workdir_on_host), type="bind")]
                if workdir_on_host is not None
                else []
            ),
            Mount(CONTAINER_RUNTIME, str(runtime_on_host), type="bind"),
        ],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "ipc_mode": "private",
        "ulimits": ulimits,
        # What the kernel's processes print outside the protocol (os.system("yes")) must
        # not fill the host's disk.
        "log_config": LogConfig(
            type="json-file", config={"max-size": str(target.log_bytes), "max-file": "1"}
        ),
        **limits,
        # network=none leaves lo up but turns IPv6 off on it: ::1 back, as a host has it.
        # (gVisor's own network stack has ::1 on its loopback already.)
        "sysctls": {} if target.runtime.gvisor else dict(LOOPBACK_V6),
        "runtime": target.runtime.name,
    }


def as_template(
    kwargs: dict[str, Any],
    options: TemplateOptions,
    config: KernelConfig,
    uid_base: int,
    oneshot_on_host: Path | None = None,
) -> None:
    """Turn a kernel container's arguments (limits, no network, read-only root, labels that
    let a later backend reap it as an orphan) into a template's: what it needs on top. With
    `options.kernels`, a kernel template's: the one-shot directory `oneshot_on_host` mounted,
    and room for its kernels (CPU for as many as there are cores, memory per slot)."""
    env = kwargs["environment"]
    env.update(template_env(options, config))
    env["HOME"] = CONTAINER_RUNS
    env["KERNELBOX_SWEEP"] = ":".join(dict.fromkeys([CONTAINER_RUNS, *SCRATCH_DIRS, "/dev/shm"]))
    lim = config.limits
    if lim.pids is not None:
        env["KERNELBOX_NPROC"] = str(lim.pids)
        kwargs["pids_limit"] = int(lim.pids) * options.slots + 64
    kwargs.update(
        entrypoint=["/usr/bin/tini", "-g", "--", "/bin/sh", "-c", CONTAINER_ENTRY, "fs"],
        command=[
            "--socket",
            f"{CONTAINER_RUNTIME}/{TEMPLATE_SOCKET}",
            "--runs",
            CONTAINER_RUNS,
            "--uid-base",
            str(uid_base),
            "--slots",
            str(options.slots),
            "--prefork",
            str(options.prefork),
        ],
        user="0:0",
        working_dir=CONTAINER_RUNS,
        cap_add=TEMPLATE_CAPS,
        sysctls={**kwargs["sysctls"], **NO_SYSV_IPC},
    )
    if options.kernels:
        assert oneshot_on_host is not None
        kwargs["command"] += ["--kernels", CONTAINER_ONESHOT]
        # What matplotlib read at the template's import is what every kernel has: inline.
        env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
        kwargs["mounts"].append(Mount(CONTAINER_ONESHOT, str(oneshot_on_host), type="bind"))
        if lim.cpus is not None:
            kwargs["nano_cpus"] = int(lim.cpus * min(options.slots, os.cpu_count() or 1) * 1e9)
        if lim.memory_bytes is not None:
            memory = int(lim.memory_bytes) + KERNEL_SLOT_BYTES * options.slots
            kwargs["mem_limit"] = kwargs["memswap_limit"] = memory
