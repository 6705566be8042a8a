"""The backend interface: found by name in the registry, described as JSON, re-attached where
the backend's kernels outlive the service (Docker), refused clearly where they do not."""

from __future__ import annotations

import asyncio
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


async def test_a_start_asks_again_at_once_when_a_reply_came_without_its_status(
    tmp_path, monkeypatch
):
    """A kernel_info reply whose status never reached us (IOPub subscribed too late) is asked
    again within milliseconds, not after the whole wait for an answer (here made 60 s)."""
    from kernelbox_server.sandbox import kernel as kernel_module

    monkeypatch.setattr(kernel_module, "ASK_AGAIN", 60.0)
    original_send = kernel_module.KernelConnection.send
    asked: list[str] = []

    def send(self, msg_type, content, budget=None):
        msg_id, queue = original_send(self, msg_type, content, budget)
        if msg_type == "kernel_info_request":
            asked.append(msg_id)
            if len(asked) == 1:  # the first request's status is lost, as when subscribed late
                real_put = queue.put_nowait
                queue.put_nowait = lambda m: None if m["msg_type"] == "status" else real_put(m)
        return msg_id, queue

    monkeypatch.setattr(kernel_module.KernelConnection, "send", send)
    backend = LocalBackend()
    workdir = tmp_path / "work"
    workdir.mkdir()
    try:
        kernel = await asyncio.wait_for(Kernel.start(backend, workdir), 50)
        assert len(asked) >= 2
        await kernel.shutdown()
    finally:
        await backend.close()
