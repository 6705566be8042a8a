"""Helpers the tests import (conftest.py is loaded by pytest as a plugin of its own: importing
it again would make a second copy of its state)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kernelbox_server.sandbox.backends.base import KernelBackend, KernelConfig
from kernelbox_server.sandbox.backends.local import LocalBackend

ROOT = Path(__file__).resolve().parent.parent
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
        from kernelbox_server.sandbox.backends.docker import DockerBackend

        return DockerBackend(config, image=IMAGE, runtime=DOCKER_RUNTIME)
    raise ValueError(name)


_CMDLINES = """
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        print(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode())
    except OSError:
        pass
"""


def container_cmdlines(container) -> list[str]:
    """The command lines of a container's processes, as the container sees them (gVisor's
    processes are not the host's); none for a container that is gone or going."""
    import docker

    try:
        ran = container.exec_run(["/opt/venv/bin/python", "-c", _CMDLINES], user="0")
    except (docker.errors.NotFound, docker.errors.APIError):  # removed, or removing (409)
        return []
    return ran.output.decode(errors="replace").splitlines()


def pypi_reachable() -> bool:
    try:
        return httpx.head("https://pypi.org/simple/httpx/", timeout=10).status_code < 500
    except httpx.HTTPError:
        return False


def fresh_venv(where: Path, requirements: list[str], timeout: float = 900) -> Path:
    """A venv of its own under `where` with `requirements` installed; its python.

    For packages whose pins clash with this project's. uv installs when the test venv has it
    (a minute instead of several for the big sets), else pip.
    """
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    uv = shutil.which("uv", path=str(Path(sys.executable).parent))
    command = (
        [uv, "pip", "install", "--python", str(python)]
        if uv
        else [str(python), "-m", "pip", "install"]
    )
    install = subprocess.run(
        [*command, "-q", *requirements], capture_output=True, text=True, timeout=timeout
    )
    assert install.returncode == 0, install.stdout + install.stderr[-3000:]
    return python
