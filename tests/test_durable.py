"""Sessions that outlive the service: the service as a real uvicorn subprocess on a fixed data
directory, killed (SIGKILL) or stopped (SIGTERM) and started again on the same directory.

Docker: the kernel containers keep running, the next service re-attaches to them, and the
variables are there without `kernel_restarted`. Local: kernels die with the service by design;
the sessions come back with their files and the next execution says `kernel_restarted`.
Either way: paused sessions resume, expired ones are not revived, another key still gets 404,
and containers that belong to no session are removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.server import free_port
from tests.support import DOCKER_RUNTIME, require_docker

KEY_A = "durable-key-a"
KEY_B = "durable-key-b"


@dataclass
class Service:
    backend: str
    data_dir: Path
    proc: subprocess.Popen
    url: str
    log_path: Path

    def client(self, key: str = KEY_A) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        )

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


@dataclass
class Deployment:
    """Services started one after the other on one data directory; what they left."""

    backend: str
    data_dir: Path
    pids: list[int] = field(default_factory=list)
    current: Service | None = None

    def start(self, **env: str) -> Service:
        port = free_port()
        log_path = self.data_dir.parent / f"service-{port}.log"
        child_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KERNELBOX_")},
            "KERNELBOX_BACKEND": self.backend,
            "KERNELBOX_PORT": str(port),
            "KERNELBOX_DATA_DIR": str(self.data_dir),
            "KERNELBOX_API_KEY": f"{KEY_A},{KEY_B}",
            "KERNELBOX_ALLOW_WEAK_ISOLATION": "1",  # a machine without bwrap still tests this
            "KERNELBOX_MIN_IDLE": "1",
            "KERNELBOX_MAX_SESSIONS": "8",
            "KERNELBOX_MEMORY_MB": "1024",
            **({"KERNELBOX_DOCKER_RUNTIME": DOCKER_RUNTIME} if DOCKER_RUNTIME else {}),
            **env,
        }
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kernelbox.cli", "serve"],
                env=child_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pids.append(proc.pid)
        service = Service(self.backend, self.data_dir, proc, f"http://127.0.0.1:{port}", log_path)
        self.current = service
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited: {service.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{service.url}/readyz", timeout=2).status_code == 200:
                    return service
            time.sleep(0.2)
        raise RuntimeError(f"the service was not ready in 180 s: {service.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: a crash. Only the service's own process: what it started must cope."""
        assert self.current is not None
        self.current.proc.kill()
        self.current.proc.wait(timeout=30)
        self.current = None

    def stop(self) -> None:
        """SIGTERM: a graceful shutdown."""
        assert self.current is not None
        self.current.proc.send_signal(signal.SIGTERM)
        try:
            self.current.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.current.proc.kill()
            self.current.proc.wait()
            raise
        self.current = None

    def containers(self) -> list:
        """Kernel containers made by any of the services of this deployment."""
        if self.backend != "docker":
            return []
        import docker

        from kernelbox_server.sandbox.backends.docker import LABEL_PID

        client = docker.from_env()
        found = []
        for pid in self.pids:
            found += client.containers.list(
                all=True, filters={"label": f"{LABEL_PID}={pid}"}, ignore_removed=True
            )
        return found


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def deployment(request) -> Iterator[Deployment]:
    if request.param == "docker":
        require_docker()
    top = Path(tempfile.mkdtemp(prefix="kb-dur-"))
    d = Deployment(request.param, top / "data")
    try:
        yield d
    finally:
        if d.current is not None:
            with contextlib.suppress(Exception):
                d.stop()
        # The last service kept its kernels running on purpose: the test removes them.
        for container in d.containers():
            with contextlib.suppress(Exception):
                container.remove(force=True)
        # Session directories may be loop-mounted filesystems (a root service with a disk
        # limit): unmount before removing.
        for log in sorted(top.glob("service-*.log")):  # shown by pytest if the test failed
            print(f"== {log.name}\n{log.read_text(errors='replace')[-20000:]}")
        for point in _mounts_under(top):
            subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(top, ignore_errors=True)


def _mounts_under(top: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return sorted((p for p in points if p.startswith(f"{top}/")), reverse=True)


def new_session(service: Service, idle_timeout: float = 3600, key: str = KEY_A) -> str:
    with service.client(key) as c:
        r = c.post("/v1/sessions", json={"idle_timeout": idle_timeout, "metadata": {"t": 1}})
        assert r.status_code in (200, 201), r.text
        return r.json()["id"]


def execute(service: Service, sid: str, code: str, key: str = KEY_A) -> dict:
    with service.client(key) as c:
        r = c.post(f"/v1/sessions/{sid}/execute", json={"code": code})
        assert r.status_code == 200, r.text
        return r.json()


def test_sessions_survive_a_crash_and_a_graceful_restart(deployment):
    docker = deployment.backend == "docker"
    svc = deployment.start()
    sid = new_session(svc)
    ran = execute(svc, sid, "x = 41\nopen('note.txt', 'w').write('kept')")
    assert ran["status"] == "ok", ran
    paused = new_session(svc)
    assert execute(svc, paused, "y = 'saved'")["status"] == "ok"
    with svc.client() as c:
        assert c.post(f"/v1/sessions/{paused}/pause").status_code == 200
    short = new_session(svc, idle_timeout=2)
    assert execute(svc, short, "z = 1")["status"] == "ok"
    short_dir = deployment.data_dir / "sessions" / short
    assert short_dir.is_dir()
    if docker:
        first = {c.id for c in deployment.containers()}
        assert len(first) >= 2, "the session's and a warm kernel's containers"

    deployment.kill()
    time.sleep(2.5)  # the short session's idle timeout passes while no service runs

    svc = deployment.start()
    with svc.client() as c:
        got = c.get(f"/v1/sessions/{sid}")
        assert got.status_code == 200, got.text
        assert got.json()["execution_count"] == 1
        assert got.json()["metadata"] == {"t": 1}
        assert c.get(f"/v1/sessions/{short}").status_code == 404, "an expired session came back"
    assert not short_dir.exists(), "the expired session's files were kept"
    with svc.client(KEY_B) as c:
        assert c.get(f"/v1/sessions/{sid}").status_code == 404, "another key sees the session"
        assert c.post(f"/v1/sessions/{sid}/execute", json={"code": "1"}).status_code == 404

    after = execute(svc, sid, "print(open('note.txt').read())\nprint(x)" if docker else
                    "print(open('note.txt').read())")  # fmt: skip
    if docker:
        assert after["status"] == "ok", after
        assert after["stdout"] == "kept\n41\n"
        assert not after.get("kernel_restarted"), after
    else:
        assert after["status"] == "ok", after
        assert after["stdout"] == "kept\n"
        assert after["kernel_restarted"] is True, "the lost kernel was not reported"
        assert "restarted" in after["notes"][0], after["notes"]
        again = execute(svc, sid, "x = 41")
        assert not again.get("kernel_restarted"), "reported twice"
    resumed = execute(svc, paused, "print(y)")
    assert resumed["stdout"] == "saved\n" and resumed["resumed"] is True, resumed
    assert not resumed.get("kernel_restarted"), resumed
    if docker:
        # The crashed service's warm kernel belonged to no session: removed. The session's
        # container is the same one, re-attached.
        wait_for(
            lambda: len([c for c in deployment.containers() if c.id in first]) == 1,
            30,
            "the crashed service's orphans removed",
        )
        old = [c for c in deployment.containers() if c.id in first]
        assert len(old) == 1, [c.name for c in old]

    # Graceful: SIGTERM, then the same data directory again.
    deployment.stop()
    if docker:
        assert [c.status for c in deployment.containers() if c.id in first] == ["running"]
    svc = deployment.start()
    if docker:
        again = execute(svc, sid, "x += 1\nprint(x)")
        assert again["stdout"] == "42\n" and not again.get("kernel_restarted"), again
    else:
        again = execute(svc, sid, "print(open('note.txt').read())")
        assert again["stdout"] == "kept\n" and again["kernel_restarted"] is True, again

    with svc.client() as c:
        for s in (sid, paused):
            assert c.delete(f"/v1/sessions/{s}").status_code in (200, 204)
    deployment.stop()
    if docker:
        wait_for(lambda: not deployment.containers(), 30, "every container removed")
    assert not list((deployment.data_dir / "sessions").iterdir()), "session files left"


@pytest.mark.docker
def test_stop_kernels_on_shutdown_stops_them_and_says_so():
    require_docker()
    top = Path(tempfile.mkdtemp(prefix="kb-dur-"))
    d = Deployment("docker", top / "data")
    try:
        svc = d.start(KERNELBOX_STOP_KERNELS_ON_SHUTDOWN="1")
        sid = new_session(svc)
        assert execute(svc, sid, "x = 1\nopen('f', 'w').write('f')")["status"] == "ok"
        d.stop()
        assert not d.containers(), "the kernels were asked to stop with the service"
        svc = d.start()
        after = execute(svc, sid, "print(open('f').read())")
        assert after["stdout"] == "f\n" and after["kernel_restarted"] is True, after
        with svc.client() as c:
            assert c.delete(f"/v1/sessions/{sid}").status_code in (200, 204)
    finally:
        if d.current is not None:
            d.stop()
        for container in d.containers():
            container.remove(force=True)
        shutil.rmtree(top, ignore_errors=True)
