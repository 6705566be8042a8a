"""Removes a Docker backend's containers once the service that made them is gone.

A kernel's container lives in the Docker engine, not under the service: a service killed with
SIGKILL (or by the OOM killer) leaves its kernels running, and with them whatever their code
started, until the next service start removes them as orphans. So each DockerBackend starts
this watcher, a process of its own that outlives the service by design:

    python docker_reaper.py LOCK_FILE INSTANCE [SESSIONS_DB]

It waits for an exclusive lock on the backend's lock file, which the backend holds for its
whole life (the OS releases it when the process ends, however it ends), then removes every
container labelled with the backend's instance but those the session registry SESSIONS_DB
names (kept.py: their sessions outlive the service, and the next one re-attaches to them),
and exits. After a graceful close there is nothing left to remove but what was kept.
Standalone (stdlib and docker-py): the service's own modules may be
mid-upgrade on disk.
"""

from __future__ import annotations

import fcntl
import os
import sys


def kept(db_path: str | None) -> set[str]:
    """The containers of registered sessions (the query of kept.py, repeated: standalone)."""
    if not db_path or not os.path.exists(db_path):
        return set()
    import sqlite3

    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
        try:
            rows = db.execute(
                "SELECT container_id FROM sessions WHERE container_id IS NOT NULL"
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        print(f"kernelbox-reaper: cannot read {db_path}: {exc}; keeping none", file=sys.stderr)
        return set()
    return {row[0] for row in rows}


def main(argv: list[str]) -> int:
    lock_path, instance, *rest = argv
    fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the service is gone (or has closed)
    import docker
    from docker.errors import APIError, NotFound

    client = docker.from_env()
    keep = kept(rest[0] if rest else None)  # read after the service is gone: its last word
    containers = [
        c
        for c in client.containers.list(
            all=True, filters={"label": f"kernelbox.instance={instance}"}, ignore_removed=True
        )
        if c.id not in keep
    ]
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
