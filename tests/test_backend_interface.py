"""The backend interface: found by name in the registry, described as JSON, re-attached where
the backend's kernels outlive the service (Docker), refused clearly where they do not."""

from __future__ import annotations

import json

import pytest

from kernelbox_server.sandbox.backends import registry
from kernelbox_server.sandbox.backends.base import CannotAttach
from kernelbox_server.sandbox.backends.local import LocalBackend
from kernelbox_server.sandbox.kernel import Kernel
from tests.support import DOCKER_RUNTIME, IMAGE, require_docker


def test_the_registry_finds_both_backends_by_name():
    assert {"local", "docker"} <= set(registry.available())
    assert registry.backend_class("local") is LocalBackend
    with pytest.raises(registry.UnknownBackend, match="installed: "):
        registry.backend_class("no-such-backend")


async def test_a_local_kernel_is_described_but_not_attached(tmp_path):
    backend = LocalBackend()
    workdir = tmp_path / "work"
    workdir.mkdir()
    try:
        kernel = await Kernel.start(backend, workdir)
        description = json.loads(json.dumps(kernel.proc.describe()))
        assert description["backend"] == "local"
        assert description["connection_info"]["key"] == kernel.proc.connection_info["key"]
        with pytest.raises(CannotAttach, match="end with the service"):
            await backend.attach(description)
        await kernel.shutdown()
    finally:
        await backend.close()


@pytest.mark.docker
async def test_a_docker_kernel_is_attached_from_its_description(tmp_path):
    require_docker()
    from kernelbox_server.sandbox.backends.docker import DockerBackend

    backend = DockerBackend(image=IMAGE, runtime=DOCKER_RUNTIME)
    try:
        first = await backend.start(tmp_path)
        description = json.loads(json.dumps(first.describe()))
        assert description["container_id"] == first.container_id
        backend._forget(first)  # as a restarted service would: the old handle is gone
        again = await backend.attach(description)
        assert again.container_id == first.container_id
        assert again.connection_info == first.connection_info
        assert await again.poll() is None
        await again.kill()
        assert (await again.wait()).exit_code is not None
        await again.cleanup()
    finally:
        await backend.close()
