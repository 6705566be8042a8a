"""The Ray mode with its kernel hosts on the Docker backend: a host is the same engine as a
service, so its kernels are containers with the same limits (and, in CI's second pass, under
gVisor). One node, one front (tests/ray_cluster.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray", reason="the Ray mode needs the `ray` extra")
from tests.ray_cluster import RayDeployment, create, ray_deployment, run, wait_for  # noqa: E402
from tests.support import DOCKER_RUNTIME, require_docker  # noqa: E402

pytestmark = pytest.mark.docker


def kernel_containers(data_dir) -> list:
    """Containers whose owner's lock file is under this deployment's data directory."""
    import docker

    from kernelbox_server.sandbox.backends.docker_owner import LABEL_LOCK

    client = docker.from_env()
    return [
        c
        for c in client.containers.list(all=True, filters={"label": LABEL_LOCK})
        if c.labels[LABEL_LOCK].startswith(f"{data_dir}/")
    ]


@pytest.fixture(scope="module")
def deployment() -> Iterator[RayDeployment]:
    require_docker()
    settings = {"KERNELBOX_BACKEND": "docker", "KERNELBOX_STOP_KERNELS_ON_SHUTDOWN": "1"}
    if DOCKER_RUNTIME:
        settings["KERNELBOX_DOCKER_RUNTIME"] = DOCKER_RUNTIME
    if image := os.environ.get("KERNELBOX_IMAGE"):
        settings["KERNELBOX_IMAGE"] = image
    with ray_deployment(1, fronts=1, **settings) as deployment:
        yield deployment
    assert not kernel_containers(deployment.data_dir), "kernel containers left behind"


def test_a_hosts_kernels_are_containers_with_the_limits(deployment):
    with deployment.fronts[0].client() as client:
        sid = create(client)
        try:
            assert len(kernel_containers(deployment.data_dir)) >= 1
            out = run(
                client,
                sid,
                "import os, socket\nprint(os.getuid(), sorted(socket.if_nameindex()))\nx = 41",
            )
            assert out["status"] == "ok", out
            uid, interfaces = out["stdout"].split(" ", 1)
            assert uid == "1000" and "lo" in interfaces and "eth0" not in interfaces
            assert run(client, sid, "print(x + 1)")["stdout"] == "42\n"
            assert client.put(f"/v1/sessions/{sid}/files/a.txt", content=b"hi").status_code == 201
            assert client.get(f"/v1/sessions/{sid}/files/a.txt").content == b"hi"
            # Once the host's pool has a warm kernel again (the create took one).
            wait_for(lambda: client.get("/readyz").status_code == 200, 120, "ready")
            ready = client.get("/readyz").json()
            assert ready["isolation"]["backend"] == "docker", ready
        finally:
            assert client.delete(f"/v1/sessions/{sid}").status_code == 204
