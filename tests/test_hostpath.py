"""Service paths -> the Docker engine's host paths (sandbox/backends/hostpath.py), and how the
backend tells a dead containerised owner from a live one. No engine needed: the engine's
answers are given as data (test_compose.py runs the real thing)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from docker.errors import NotFound

from kernelbox_server.sandbox.backends.docker import (
    LABEL_CONTAINER,
    LABEL_CONTAINER_START,
    LABEL_LOCK,
    LABEL_PIDNS,
    DockerBackend,
)
from kernelbox_server.sandbox.backends.hostpath import HostPathError, HostPaths, own_container_id

CID = "267686153b041c01cdc4acd9d4dec6806f49b8dc51b2610305128739b5b7b372"
# As the engine writes them (Docker 20.10, ext4 /var/lib/docker on the root filesystem).
MOUNTINFO = f"""\
71 50 0:52 / / rw,relatime - fuse.fuse-overlayfs fuse-overlayfs rw,user_id=0
88 71 254:0 /var/lib/docker/containers/{CID}/resolv.conf /etc/resolv.conf rw - ext4 /dev/vda rw
89 71 254:0 /var/lib/docker/containers/{CID}/hostname /etc/hostname rw,relatime - ext4 /dev/vda rw
90 71 254:0 /var/lib/docker/volumes/kb_data/_data /var/lib/kernelbox rw,relatime - ext4 /dev/vda rw
"""
# The host itself sees containers' shm mounts, whose *mount points* name a container.
HOST_MOUNTINFO = f"""\
25 1 254:0 / / rw,relatime - ext4 /dev/vda rw
301 25 0:60 / /var/lib/docker/containers/{CID}/mounts/shm rw - tmpfs shm rw,size=65536k
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_own_container_id_from_mountinfo(tmp_path):
    mountinfo = write(tmp_path, "mountinfo", MOUNTINFO)
    assert own_container_id(mountinfo, write(tmp_path, "cgroup", "0::/\n")) == CID


def test_own_container_id_from_cgroup_v1_and_systemd_v2(tmp_path):
    nothing = write(tmp_path, "mountinfo", "")
    v1 = write(tmp_path, "v1", f"12:pids:/docker/{CID}\n1:name=systemd:/docker/{CID}\n")
    assert own_container_id(nothing, v1) == CID
    v2 = write(tmp_path, "v2", f"0::/system.slice/docker-{CID}.scope\n")
    assert own_container_id(nothing, v2) == CID


def test_not_in_a_container(tmp_path):
    host = write(tmp_path, "mountinfo", HOST_MOUNTINFO)
    assert own_container_id(host, write(tmp_path, "cgroup", "9:name=systemd:/\n0::/\n")) is None


def inspect(mounts: list[dict]) -> dict:
    return {
        "Id": CID,
        "Name": "/kb_kernelbox_1",
        "State": {"StartedAt": "2026-11-21T03:01:07.961563396Z"},
        "Mounts": mounts,
    }


VOLUME = {
    "Type": "volume",
    "Name": "kb_data",
    "Source": "/var/lib/docker/volumes/kb_data/_data",
    "Destination": "/var/lib/kernelbox",
}
SOCKET = {"Type": "bind", "Source": "/run/docker.sock", "Destination": "/var/run/docker.sock"}


def test_named_volume_and_nested_bind_mount():
    nested = {"Type": "bind", "Source": "/srv/kb-run", "Destination": "/var/lib/kernelbox/run"}
    tmpfs = {"Type": "tmpfs", "Source": "", "Destination": "/tmp"}
    paths = HostPaths.from_container(inspect([SOCKET, VOLUME, nested, tmpfs]))
    assert paths.container_id == CID and not paths.identity
    assert paths.container_started.startswith("2026-11-21")
    assert paths.to_host("/var/lib/kernelbox/instance-7-ab/s1/work") == Path(
        "/var/lib/docker/volumes/kb_data/_data/instance-7-ab/s1/work"
    )
    assert paths.to_host("/var/lib/kernelbox") == Path("/var/lib/docker/volumes/kb_data/_data")
    # The longest destination wins.
    assert paths.to_host("/var/lib/kernelbox/run/k-1") == Path("/srv/kb-run/k-1")
    # No prefix matching on names: /var/lib/kernelbox2 is not under /var/lib/kernelbox.
    with pytest.raises(HostPathError, match="KERNELBOX_HOST_DATA_DIR"):
        paths.to_host("/var/lib/kernelbox2/x")
    # A tmpfs is no host directory; nor is the container's own layer.
    for inside in ("/tmp/kernelbox/x", "/opt/kernelbox"):
        with pytest.raises(HostPathError):
            paths.to_host(inside)
    # `..` cannot climb out of a mount into a translation.
    with pytest.raises(HostPathError):
        paths.to_host("/var/lib/kernelbox/../../etc")


def test_identity_on_the_host_and_fixed_mapping():
    assert HostPaths().identity
    assert HostPaths().to_host("/tmp/kernelbox/run/k-1") == Path("/tmp/kernelbox/run/k-1")
    fixed = HostPaths.fixed("/var/lib/kernelbox", "/srv/kernelbox")
    assert fixed.to_host("/var/lib/kernelbox/run") == Path("/srv/kernelbox/run")
    with pytest.raises(HostPathError):
        fixed.to_host("/tmp/x")


def test_detect_on_the_host_asks_no_engine(monkeypatch):
    import kernelbox_server.sandbox.backends.hostpath as hostpath

    monkeypatch.setattr(hostpath, "own_container_id", lambda: None)
    monkeypatch.setattr(hostpath.socket, "gethostname", lambda: "builder")
    assert HostPaths.detect(client=None).identity


def test_detect_in_a_container(monkeypatch):
    import kernelbox_server.sandbox.backends.hostpath as hostpath

    monkeypatch.setattr(hostpath, "own_container_id", lambda: CID)
    asked = []

    def inspect_container(container_id):
        asked.append(container_id)
        return inspect([SOCKET, VOLUME])

    client = SimpleNamespace(api=SimpleNamespace(inspect_container=inspect_container))
    paths = HostPaths.detect(client)
    assert asked == [CID]
    assert paths.to_host("/var/lib/kernelbox/run") == Path(
        "/var/lib/docker/volumes/kb_data/_data/run"
    )


# -- the owner of a kernel container, when its lock file cannot be seen here --------------------


def owner_gone(state: dict | None, labels: dict) -> bool:
    """DockerBackend._owner_gone with the engine answering `state` for the owner's container."""

    def inspect_container(container_id):
        if state is None:
            raise NotFound("no such container")
        return {"State": state}

    backend = SimpleNamespace(
        client=SimpleNamespace(api=SimpleNamespace(inspect_container=inspect_container))
    )
    return DockerBackend._owner_gone(backend, labels, {})


LABELS = {
    LABEL_LOCK: "/nowhere/kernelbox/run/owner-x.lock",  # not visible here
    LABEL_PIDNS: "pid:[1]",  # another pid namespace: pids say nothing
    LABEL_CONTAINER: CID,
    LABEL_CONTAINER_START: "2026-11-21T03:01:07Z",
}


def test_owner_container_alive_gone_stopped_or_restarted():
    assert not owner_gone({"Running": True, "StartedAt": "2026-11-21T03:01:07Z"}, LABELS)
    assert owner_gone(None, LABELS)  # removed
    assert owner_gone({"Running": False, "StartedAt": "2026-11-21T03:01:07Z"}, LABELS)
    assert owner_gone({"Running": True, "StartedAt": "2026-11-21T04:00:00Z"}, LABELS)
    # No container label and no lock, another pid namespace: never touched.
    plain = {k: v for k, v in LABELS.items() if k not in (LABEL_CONTAINER, LABEL_CONTAINER_START)}
    assert not owner_gone(None, plain)
