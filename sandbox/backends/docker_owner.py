"""Who owns a kernel container: the labels every container of ours carries, and the identity
of the process they name (its pid and start time, pid namespace, host boot, lock file and
container), by which a later backend tells a live owner from a dead one (docker_orphans.py)."""

from __future__ import annotations

import os

import psutil

from .hostpath import HostPaths

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


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id")


def pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def in_cgroup_of(pid: int, container_id: str) -> bool:
    """Whether process `pid`, as this process sees pids, runs in that container."""
    return container_id in _read(f"/proc/{pid}/cgroup")


def process_start(pid: int) -> str:
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
        labels += [f"{LABEL_PID}={pid}", f"{LABEL_BOOT}={boot_id()}", f"{LABEL_PIDNS}={pid_ns()}"]
    return {"label": labels}


def owner_labels(instance: str, lock_path: str, host_paths: HostPaths) -> dict[str, str]:
    """The labels naming this process (and the backend `instance` in it) as the owner."""
    labels = {
        LABEL_INSTANCE: instance,
        LABEL_PID: str(os.getpid()),
        LABEL_PID_START: process_start(os.getpid()),
        LABEL_PIDNS: pid_ns(),
        LABEL_BOOT: boot_id(),
        LABEL_LOCK: lock_path,
    }
    if host_paths.container_id:
        labels[LABEL_CONTAINER] = host_paths.container_id
        labels[LABEL_CONTAINER_START] = host_paths.container_started or ""
    return labels
