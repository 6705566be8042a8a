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

from sandbox.backends.base import KernelBackend, KernelConfig
from sandbox.backends.local import LocalBackend

IMAGE = os.environ.get("KERNELBOX_IMAGE", "kernelbox-kernel:latest")
REQUIRE_DOCKER = os.environ.get("KERNELBOX_REQUIRE_DOCKER") == "1"
DOCKER_RUNTIME = os.environ.get("KERNELBOX_DOCKER_RUNTIME") or None


def docker_unavailable_reason() -> str | None:
    """Why Docker tests cannot run here, or None when they can."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as exc:
        return f"no Docker engine reachable ({exc.__class__.__name__}: {exc})"
    try:
        client.images.get(IMAGE)
    except Exception:
        return f"kernel image {IMAGE} is not built (run `make image`)"
    return None


# Node ids of the tests marked `docker`: CI selects them with `-m docker` to run them again
# under another runtime, so a test that reaches the engine unmarked is an error.
_DOCKER_MARKED: set[str] = set()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _DOCKER_MARKED.update(item.nodeid for item in items if item.get_closest_marker("docker"))


def require_docker() -> None:
    current = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    if current and current not in _DOCKER_MARKED:
        pytest.fail(f"{current} uses the Docker engine but is not marked pytest.mark.docker")
    reason = docker_unavailable_reason()
    if reason is None:
        return
    if REQUIRE_DOCKER:
        pytest.fail(f"KERNELBOX_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(reason)


def make_backend(name: str, config: KernelConfig | None = None) -> KernelBackend:
    if name == "local":
        return LocalBackend(config)
    if name == "docker":
        require_docker()
        from sandbox.backends.docker import DockerBackend

        return DockerBackend(config, image=IMAGE, runtime=DOCKER_RUNTIME)
    raise ValueError(name)


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


BOOT_SCRIPTS = ("kernel_boot.py", "forkserver_boot.py")


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

        from sandbox.backends.docker import our_containers_filter

        client = docker.from_env()
        client.ping()
    except Exception:
        return  # no engine reachable: nothing can have been left there
    leftovers = client.containers.list(all=True, filters=our_containers_filter(pid=os.getpid()))
    for container in leftovers:
        container.remove(force=True)
    assert not leftovers, f"kernel containers left behind: {[c.name for c in leftovers]}"
