"""Containers left by a service that is gone: found by their labels, removed by the next
backend that starts (docker_reaper.py, the watcher process, covers the time in between)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from docker.errors import DockerException, NotFound

from .base import SANDBOX_RUNTIME
from .docker_owner import (
    LABEL_BOOT,
    LABEL_CONTAINER,
    LABEL_CONTAINER_START,
    LABEL_INSTANCE,
    LABEL_LOCK,
    LABEL_PID,
    LABEL_PID_START,
    LABEL_PIDNS,
    boot_id,
    our_containers_filter,
    pid_ns,
    process_start,
)
from .docker_spec import CONTAINER_ONESHOT, oneshot_dir
from .hostpath import HostPaths

log = logging.getLogger(__name__)


def reap_orphans(
    client: Any,
    instance: str,
    host_paths: HostPaths,
    remove: Callable[[str], None],
    keep: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """Remove containers whose owning service is gone (any but backend `instance`'s, with
    `remove`), except those in `keep` (the kernels of registered sessions, which a restarted
    service re-attaches to: see backends/kept.py); returns their names.

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
        found = client.containers.list(
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
            owner = labels.get(LABEL_INSTANCE, "")
            if owner == instance or container.id in keep:
                continue
            if owner not in verdicts:
                verdicts[owner] = owner_gone(client, labels, held)
            if verdicts[owner]:
                log.info("removing orphaned kernel container %s", container.name)
                with contextlib.suppress(DockerException):
                    remove(container.id)
                    removed.append(container.name)
                _remove_runtime_dir(host_paths, container, labels.get(LABEL_LOCK, ""), held)
    finally:
        for lock_path, fd in held.items():
            # The dead owner's files go too: its whole root if it made it, else its lock.
            root = Path(lock_path).parent
            if root.name.startswith("kernelbox-docker-"):
                shutil.rmtree(root, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)
                instance = Path(lock_path).name.removeprefix("owner-").removesuffix(".lock")
                shutil.rmtree(oneshot_dir(root, instance), ignore_errors=True)
            os.close(fd)
    return removed


def _remove_runtime_dir(
    host_paths: HostPaths, container: Any, lock_path: str, held: dict[str, int]
) -> None:
    # Only a directory next to a lock we hold: a label or mount is no licence to delete.
    if lock_path not in held:
        return
    root = Path(lock_path).parent
    try:
        host_root = host_paths.to_host(root)  # mount sources are the engine's paths
    except RuntimeError:
        return
    for mount in container.attrs.get("Mounts", []):
        source = Path(mount.get("Source") or "/")
        # Its runtime directory, and a kernel template's one-shot working directories.
        mounted_at = mount.get("Destination")
        if mounted_at in (SANDBOX_RUNTIME, CONTAINER_ONESHOT) and source.parent == host_root:
            shutil.rmtree(root / source.name, ignore_errors=True)


def owner_gone(client: Any, labels: dict[str, str], held: dict[str, int]) -> bool:
    """Whether the owner the labels name is gone (see `reap_orphans`); a lock taken to learn
    it is left in `held` (lock path -> fd), kept until its containers are removed."""
    if labels.get(LABEL_BOOT) and boot_id() and labels[LABEL_BOOT] != boot_id():
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
            state = client.api.inspect_container(labels[LABEL_CONTAINER])["State"]
        except NotFound:
            return True
        except DockerException as exc:
            log.warning("cannot tell whether the owner of a kernel is alive: %s", exc)
            return False
        started = labels.get(LABEL_CONTAINER_START)
        return not state.get("Running") or bool(started and state.get("StartedAt") != started)
    if labels.get(LABEL_PIDNS) == pid_ns() and labels.get(LABEL_PID, "").isdigit():
        pid = int(labels[LABEL_PID])
        return process_start(pid) != labels.get(LABEL_PID_START)
    return False
