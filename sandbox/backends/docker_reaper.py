"""Removes a Docker backend's containers once the service that made them is gone.

A kernel's container lives in the Docker engine, not under the service: a service killed with
SIGKILL (or by the OOM killer) leaves its kernels running, and with them whatever their code
started, until the next service start removes them as orphans. So each DockerBackend starts
this watcher, a process of its own that outlives the service by design:

    python docker_reaper.py LOCK_FILE INSTANCE

It waits for an exclusive lock on the backend's lock file, which the backend holds for its
whole life (the OS releases it when the process ends, however it ends), then removes every
container labelled with the backend's instance, and exits. After a graceful close there is
nothing left to remove. Standalone (stdlib and docker-py): the service's own modules may be
mid-upgrade on disk.
"""

from __future__ import annotations

import fcntl
import os
import sys


def main(argv: list[str]) -> int:
    lock_path, instance = argv
    fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the service is gone (or has closed)
    import docker
    from docker.errors import APIError, NotFound

    client = docker.from_env()
    containers = client.containers.list(
        all=True, filters={"label": f"kernelbox.instance={instance}"}, ignore_removed=True
    )
    for container in containers:
        try:
            client.api.remove_container(container.id, force=True, v=True)
        except (NotFound, APIError) as exc:  # gone meanwhile, or its removal under way
            print(f"kernelbox-reaper: {container.name}: {exc}", file=sys.stderr)
    if containers:
        print(f"kernelbox-reaper: removed {len(containers)} containers of a service that is gone",
              file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
