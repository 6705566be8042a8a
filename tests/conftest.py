"""Shared fixtures: real backends, real kernels, and a check that nothing is left behind.

Docker tests skip only where no engine (or no kernel image) is reachable; with
KERNELBOX_REQUIRE_DOCKER=1 (set by CI) that skip becomes a failure.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.support import _DOCKER_MARKED, make_backend, require_docker


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Node ids of the tests marked `docker`, for require_docker (see tests/support.py).
    _DOCKER_MARKED.update(item.nodeid for item in items if item.get_closest_marker("docker"))


@pytest.fixture(scope="session", params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def backend_name(request) -> str:
    if request.param == "docker":
        require_docker()
    return request.param


@pytest.fixture(scope="session")
async def backend(backend_name):
    b = make_backend(backend_name)
    yield b
    await b.close()


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(prefix="kb-test-") as d:
        path = Path(d) / "work"
        path.mkdir()
        os.chmod(d, 0o755)
        yield path


BOOT_SCRIPTS = ("kernel_boot.py", "forkserver_boot.py", "kernel_template_boot.py")


def _our_kernels() -> list[psutil.Process]:
    me = psutil.Process()
    found = []
    for proc in me.children(recursive=True):
        try:
            # Fork-server templates (and the runs they fork) count as kernels here.
            if any(s in part for part in proc.cmdline() for s in BOOT_SCRIPTS):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_kernel_left_behind():
    """Fails the run if a kernel process outlives the tests (and kills it anyway)."""
    yield
    leftovers = _our_kernels()
    for proc in leftovers:
        proc.kill()
    assert not leftovers, f"kernel processes left behind: {[p.pid for p in leftovers]}"


@pytest.fixture(scope="session", autouse=True)
def no_container_left_behind():
    """Fails the run if a kernel container made by this process outlives the tests.

    Only containers labelled with this test process as their owner count, so another test
    run on the same engine is not mistaken for a leak. Leftovers are removed anyway.
    """
    yield
    try:
        import docker

        from kernelbox_server.sandbox.backends.docker import our_containers_filter

        client = docker.from_env()
        client.ping()
    except Exception:
        return  # no engine reachable: nothing can have been left there
    leftovers = client.containers.list(all=True, filters=our_containers_filter(pid=os.getpid()))
    for container in leftovers:
        container.remove(force=True)
    assert not leftovers, f"kernel containers left behind: {[c.name for c in leftovers]}"
