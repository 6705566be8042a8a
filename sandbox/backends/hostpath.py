"""Paths as the Docker engine sees them, for a service that itself runs in a container.

The Docker backend asks the engine to bind-mount a session's working directory and a kernel's
runtime directory into the kernel's container. The engine resolves a bind mount's source in
*its* filesystem (the host's), not in the service's. When the service runs on the host the two
are the same; when it runs in a container (docker-compose.yml), the service sees its data
directory at, say, /var/lib/kernelbox, which is a named volume whose files are at
/var/lib/docker/volumes/<name>/_data on the host, or a bind mount of some host directory.

`HostPaths.detect` finds the service's own container (its id is in /proc/self/mountinfo: the
engine bind-mounts /etc/hostname from /var/lib/docker/containers/<id>/), asks the engine for
that container's mounts, and translates a service path under a mount's destination to the
mount's source plus the rest of the path. Outside a container every path is its own host path.
`HostPaths.fixed` states the mapping instead (KERNELBOX_HOST_DATA_DIR), for engines or socket
proxies where the service cannot inspect its own container.

Only the bind-mount sources are translated: the service still reaches the kernel's sockets at
its own paths (same files, seen through its own mount), so the unix socket path limit applies
to the service-side path only.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger(__name__)

_CONTAINER_ID = re.compile(r"(?:^|/)(?:containers|overlay-containers)/([0-9a-f]{64})(?:/|$)")
_CGROUP_ID = re.compile(r"(?:docker[-/]|libpod[-/]|/)([0-9a-f]{64})(?:\.scope)?(?:/|$)")
# Files the engine bind-mounts into every container from that container's own directory.
_ENGINE_FILES = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")


class HostPathError(RuntimeError):
    """A service path the engine cannot bind-mount (it is not on a volume or bind mount)."""


def own_container_id(
    mountinfo: str = "/proc/self/mountinfo", cgroup: str = "/proc/self/cgroup"
) -> str | None:
    """The id of the container this process runs in, or None (not in a container, or unknown).

    Read from the root of the engine's /etc/hostname bind mount (reliable with cgroup v1 and
    v2), else from the cgroup path (v1, or v2 without a cgroup namespace).
    """
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                # 4th field: the mount's root in its filesystem; 5th: where it is mounted.
                if len(fields) > 4 and fields[4] in _ENGINE_FILES:
                    found = _CONTAINER_ID.search(fields[3])
                    if found:
                        return found.group(1)
    except OSError:
        pass
    try:
        with open(cgroup) as f:
            for line in f:
                found = _CGROUP_ID.search(line.rsplit(":", 1)[-1].strip())
                if found:
                    return found.group(1)
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class HostPaths:
    """Service path -> host path, by the service container's mounts (longest destination first)."""

    #: (destination as the service sees it, source on the engine's host)
    mounts: tuple[tuple[PurePosixPath, PurePosixPath], ...] = ((PurePosixPath("/"),) * 2,)
    #: the container the service runs in (None: on the host, or a fixed mapping)
    container_id: str | None = None
    #: when that container started (State.StartedAt): a restart of it is another service run
    container_started: str | None = None
    #: how the mapping was found, for messages
    origin: str = "host"
    _sorted: tuple = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        ordered = sorted(self.mounts, key=lambda m: len(m[0].parts), reverse=True)
        object.__setattr__(self, "_sorted", tuple(ordered))

    @property
    def identity(self) -> bool:
        return self.mounts == ((PurePosixPath("/"), PurePosixPath("/")),)

    @classmethod
    def fixed(cls, service_dir: str | os.PathLike, host_dir: str | os.PathLike) -> HostPaths:
        """Only paths under `service_dir` are bindable, at `host_dir` on the engine's host."""
        return cls(
            ((PurePosixPath(os.path.abspath(service_dir)), PurePosixPath(host_dir)),),
            origin=f"{service_dir} = {host_dir} on the host (KERNELBOX_HOST_DATA_DIR)",
        )

    @classmethod
    def from_container(cls, attrs: dict[str, Any]) -> HostPaths:
        """From the engine's `inspect` of the service's container."""
        mounts = []
        for m in attrs.get("Mounts") or []:
            # bind and volume mounts are directories of the host; tmpfs and others are not.
            if m.get("Type") in ("bind", "volume") and m.get("Source") and m.get("Destination"):
                mounts.append((PurePosixPath(m["Destination"]), PurePosixPath(m["Source"])))
        return cls(
            tuple(mounts),
            container_id=attrs["Id"],
            container_started=(attrs.get("State") or {}).get("StartedAt"),
            origin=f"the mounts of container {attrs.get('Name', '').lstrip('/')} "
            f"({attrs['Id'][:12]})",
        )

    @classmethod
    def detect(cls, client: Any) -> HostPaths:
        """Ask the engine about our own container; on the host, the identity."""
        container_id = own_container_id()
        if container_id is None:
            # A hostname that is a short container id: the engine's default in a container.
            name = socket.gethostname()
            if not re.fullmatch(r"[0-9a-f]{12}", name) or not os.path.exists("/.dockerenv"):
                return cls()
            container_id = name
        from docker.errors import NotFound

        try:
            attrs = client.api.inspect_container(container_id)
        except NotFound:
            # A container of another engine (the socket of a host engine in a nested one):
            # nothing tells us how paths map. The backend fails later on, with a clear
            # error, if what it binds does not exist on the engine's host.
            log.warning(
                "running in container %s, which the Docker engine does not know: assuming "
                "paths are the same on the engine's host (set KERNELBOX_HOST_DATA_DIR if not)",
                container_id[:12],
            )
            return cls()
        paths = cls.from_container(attrs)
        log.info("kernel bind mounts: service paths translated by %s", paths.origin)
        return paths

    def to_host(self, path: str | os.PathLike) -> Path:
        """Where the engine finds `path` (a service path, absolute)."""
        p = PurePosixPath(os.path.normpath(os.path.abspath(path)))
        for dest, source in self._sorted:
            if p == dest or dest in p.parents:
                return Path(source / p.relative_to(dest))
        raise HostPathError(
            f"{p} is not on any volume or bind mount of the service's container, so the Docker "
            f"engine cannot bind it into a kernel container ({self.origin}). Put "
            f"KERNELBOX_DATA_DIR on a volume (docker-compose.yml mounts one at "
            f"/var/lib/kernelbox), or set KERNELBOX_HOST_DATA_DIR to its path on the host."
        )
