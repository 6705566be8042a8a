"""Whose files are whose between the service and its kernel containers.

The kernel must read and replace what the service writes into the working directory (uploads,
saved images) and the service must read and delete what the kernel writes there and in the
runtime directory (sockets). So:
  - service not root: the container runs as the service's own uid:gid; both sides own
    everything they create, no chown is needed. The uid need not exist in the image.
  - service root: the container runs as the image's `sandbox` user (1000:1000) and the workdir
    tree and runtime directory are chowned to it at each start; root reads and deletes
    anything. Files the service writes later are chowned to it too (`file_owner`).
Under the engine's userns-remap a container's ids are shifted on the host (`id_shift`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..files import give_tree
from .base import socket_path

log = logging.getLogger(__name__)

#: the image's non-root user
SANDBOX_UID_GID = (1000, 1000)
_CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


@dataclass(frozen=True)
class Ownership:
    #: uid:gid the container runs as, as the container sees them
    user: tuple[int, int]
    #: what a container's uid and gid are shifted by, as this service sees files
    id_shift: tuple[int, int] = (0, 0)

    @classmethod
    def decide(cls, user: tuple[int, int] | None, id_shift: tuple[int, int]) -> Ownership:
        """The choice of the module docstring (`user` overrides it); RuntimeError where the
        service cannot give the kernel its files."""
        if user is None:
            user = SANDBOX_UID_GID if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        ownership = cls(user, id_shift)
        if ownership.chown and id_shift != (0, 0) and os.geteuid() != 0:
            raise RuntimeError(
                "the Docker engine remaps user namespaces (userns-remap): a kernel's files "
                f"belong to uid {ownership.host_owner[0]} on the host, which only a root "
                "service can give them; run the service as root"
            )
        return ownership

    def host_ids(self, uid: int, gid: int) -> tuple[int, int]:
        """The host's ids for a container's `uid` and `gid`."""
        return uid + self.id_shift[0], gid + self.id_shift[1]

    @property
    def host_owner(self) -> tuple[int, int]:
        return self.host_ids(*self.user)

    @property
    def chown(self) -> bool:
        """Whether files must change hands (the kernel is not the service's own user)."""
        return self.host_owner != (os.geteuid(), os.getegid())

    @property
    def file_owner(self) -> tuple[int, int] | None:
        """Whom the files the service writes must belong to; None: the service's own."""
        return self.host_owner if self.chown else None

    def give_to_kernel(self, workdir: Path, runtime_dir: Path) -> None:
        uid, gid = self.host_owner
        os.chown(runtime_dir, uid, gid)
        os.chown(runtime_dir / "connection.json", uid, gid)
        # Through directory descriptors, never a link (the kernel may have planted links to
        # host files), iteratively (its tree may be thousands of levels deep).
        if not give_tree(workdir, (uid, gid)):
            log.warning("%s: too many entries to give them all to the kernel", workdir)


async def seal_runtime_dir(
    info: dict, runtime_dir: Path, gone: Callable[[], bool], timeout: float
) -> None:
    """Once the kernel has bound its sockets, take its runtime directory back.

    Otherwise code in the kernel could swap a socket for a symlink to some other unix socket
    on the host, which the engine's ZMQ client would follow on its next reconnect. Bound
    sockets stay connectable; the kernel no longer needs the directory. Only possible when the
    kernel runs under another uid than the service (root service).
    """
    paths = [Path(socket_path(info, channel)) for channel in _CHANNELS]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not all(p.is_socket() for p in paths):
        if gone() or loop.time() > deadline:
            return
        await asyncio.sleep(0.02)
    with contextlib.suppress(OSError):
        # Searchable first, then ours: the other order leaves a moment when the directory is
        # the service's and still 0700, and the kernel, just past binding, stats its
        # connection file in it (ipykernel's write_connection_file): EACCES, a failed start.
        os.chmod(runtime_dir, 0o755)
        os.chown(runtime_dir, os.geteuid(), os.getegid())
