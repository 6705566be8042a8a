"""The hostile suite's harness: a real service, attacked, watched from outside.

Each backend gets one service, run as `kernelbox serve` in a process of its own (so its memory
and its processes are its own, and it can be killed), with two API keys: the attacker's and a
bystander's. Around every case (the `hostile` fixture):

- a prober asks `/healthz` every quarter second; every answer must come within a second;
- it samples the service's resident memory; the peak must stay within MEMORY_BOUND;
- the bystander's session must keep its variable afterwards;
- the attacker's sessions are deleted afterwards, and then no process or container of the
  service is left beyond its warm pool and templates.
When the service stops at the end, nothing of it may be left: processes, containers, files,
mounts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from tests.server import free_port
from tests.support import DOCKER_RUNTIME, IMAGE, require_docker

ATTACKER = "attacker-key-0123456789"
BYSTANDER = "bystander-key-9876543210"
# The service's resident memory may grow by at most this much over its idle size during a
# case (see README, "Limits and bad input": what one flooding session can make it hold).
MEMORY_BOUND = 600 * 1024**2
PROBE_EVERY = 0.25
PROBE_LIMIT = 1.0

SERVICE_ENV = {
    "KERNELBOX_API_KEY": f"{ATTACKER},{BYSTANDER}",
    "KERNELBOX_MAX_SESSIONS": "12",  # a key's share: 6
    "KERNELBOX_MIN_IDLE": "2",
    "KERNELBOX_DISK_MB": "64",
    "KERNELBOX_MEMORY_MB": "1536",
    "KERNELBOX_PIDS": "128",
    "KERNELBOX_HEADER_TIMEOUT": "2",
    "KERNELBOX_DEFAULT_TIMEOUT": "20",
    "KERNELBOX_RUN_CODE_TEMPLATES": "1",
    "KERNELBOX_RUN_CODE_SLOTS": "8",  # a key's share of one-shot runs: 4
    "KERNELBOX_IMAGE": IMAGE,
}


@dataclass
class Prober:
    """Asks /healthz on its own thread; remembers the slowest answer and the memory peak."""

    url: str
    pid: int
    slowest: float = 0.0
    failures: list[str] = field(default_factory=list)
    memory_peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.slowest, self.failures, self.memory_peak = 0.0, [], 0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        proc = psutil.Process(self.pid)
        with httpx.Client(timeout=PROBE_LIMIT * 5) as client:
            while not self._stop.wait(PROBE_EVERY):
                started = time.monotonic()
                try:
                    ok = client.get(f"{self.url}/healthz").status_code == 200
                    took = time.monotonic() - started
                    if not ok or took > PROBE_LIMIT:
                        self.failures.append(f"/healthz took {took:.2f} s (ok={ok})")
                except httpx.HTTPError as exc:
                    self.failures.append(f"/healthz failed: {exc!r}")
                    took = time.monotonic() - started
                self.slowest = max(self.slowest, took)
                with contextlib.suppress(psutil.Error):
                    self.memory_peak = max(self.memory_peak, proc.memory_info().rss)


@dataclass
class Service:
    backend: str
    url: str
    proc: subprocess.Popen
    data_dir: Path
    log_path: Path
    prober: Prober
    idle_memory: int = 0
    bystander: str = ""

    def client(self, key: str = ATTACKER, timeout: float = 120) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        )

    def sync_client(self, key: str = ATTACKER, timeout: float = 120) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        )

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the service was not ready in {timeout} s: {self.log_tail()}")

    def kernel_processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    @property
    def gvisor(self) -> bool:
        """Kernels under gVisor: their processes and FIFOs are not the host's to see."""
        return self.backend == "docker" and DOCKER_RUNTIME == "runsc"

    def workdir_of(self, sid: str) -> Path:
        """A session's working directory, as the host sees it."""
        found = list(self.data_dir.glob(f"sessions/{sid}/work"))
        assert len(found) == 1, found
        return found[0]

    def containers(self) -> list:
        if self.backend != "docker":
            return []
        import docker

        from kernelbox_server.sandbox.backends.docker import LABEL_PID

        client = docker.from_env()
        return client.containers.list(
            all=True, filters={"label": f"{LABEL_PID}={self.proc.pid}"}, ignore_removed=True
        )


def start_service(backend: str, data_dir: Path, **env: str) -> Service:
    port = free_port()
    log_path = data_dir.parent / f"service-{backend}-{port}.log"
    log = open(log_path, "wb")
    child_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KERNELBOX_")},
        **SERVICE_ENV,
        "KERNELBOX_BACKEND": backend,
        "KERNELBOX_PORT": str(port),
        "KERNELBOX_DATA_DIR": str(data_dir),
        **({"KERNELBOX_DOCKER_RUNTIME": DOCKER_RUNTIME} if DOCKER_RUNTIME else {}),
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernelbox.cli", "serve"],
        env=child_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    service = Service(backend, url, proc, data_dir, log_path, Prober(url, proc.pid))
    try:
        service.wait_ready()
    except BaseException:
        stop_service(service)
        raise
    return service


def stop_service(service: Service) -> None:
    if service.proc.poll() is None:
        service.proc.send_signal(signal.SIGTERM)
        try:
            service.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            service.proc.kill()
            service.proc.wait()


@pytest.fixture(scope="session", params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def service(request) -> Iterator[Service]:
    if request.param == "docker":
        require_docker()
    data_dir = Path(tempfile.mkdtemp(prefix="kb-hostile-")) / "data"
    svc = start_service(request.param, data_dir)
    try:
        with svc.sync_client(BYSTANDER) as c:
            svc.bystander = c.post("/v1/sessions", json={"idle_timeout": 3600}).json()["id"]
            ran = c.post(f"/v1/sessions/{svc.bystander}/execute", json={"code": "x = 42"})
            assert ran.json()["status"] == "ok", ran.text
            # The fork server starts on first use: before the baselines are taken.
            warmed = c.post("/run_code", json={"code": "1", "language": "python"})
            assert warmed.json()["status"] == "Success", warmed.text
        svc.prober.start()
        time.sleep(1)
        svc.idle_memory = psutil.Process(svc.proc.pid).memory_info().rss
        yield svc
    finally:
        if svc.prober.__dict__.get("_thread"):
            svc.prober.stop()
        _end_sessions(svc)
        stop_service(svc)
        _assert_nothing_left(svc)
        shutil.rmtree(data_dir.parent)


def _end_sessions(svc: Service) -> None:
    """Sessions outlive the service (their kernels, files and records): a test that must
    leave nothing behind deletes them first, as a user would."""
    if svc.proc.poll() is not None:
        return
    for key in (ATTACKER, BYSTANDER):
        with svc.sync_client(key) as c:
            for session in c.get("/v1/sessions").json():
                c.delete(f"/v1/sessions/{session['id']}")


def _assert_nothing_left(svc: Service) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (svc.containers() or _mounts_under(svc.data_dir)):
        time.sleep(0.5)
    assert not svc.containers(), f"containers left: {[c.name for c in svc.containers()]}"
    assert not _mounts_under(svc.data_dir), f"mounts left: {_mounts_under(svc.data_dir)}"
    # The registry (empty now) and the data directory's lock stay for the next service.
    registry = {".lock", "sessions", "run"} | {f"sessions.db{x}" for x in ("", "-wal", "-shm")}
    left = [p for p in svc.data_dir.rglob("*")] if svc.data_dir.exists() else []
    left = [p for p in left if str(p.relative_to(svc.data_dir)) not in registry]
    assert not left, f"files left in the data directory: {left[:10]}"
    # uvicorn re-raises SIGTERM once it has shut down gracefully.
    assert svc.proc.returncode == -signal.SIGTERM, f"the service ended with {svc.proc.returncode}"


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


@pytest.fixture
def hostile(service: Service) -> Iterator[Service]:
    """One case: the service must stay healthy, bounded and tidy throughout and after."""
    service.prober.reset()
    baseline = (len(service.kernel_processes()), len(service.containers()))
    yield service
    with service.sync_client(ATTACKER) as c:
        for session in c.get("/v1/sessions").json():
            c.delete(f"/v1/sessions/{session['id']}")
    with service.sync_client(BYSTANDER) as c:
        kept = c.post(f"/v1/sessions/{service.bystander}/execute", json={"code": "x"}).json()
    assert kept["status"] == "ok" and kept["results"][0]["data"]["text/plain"] == "42", kept
    prober = service.prober
    assert not prober.failures, f"health probes failed: {prober.failures[:5]}"
    grown = prober.memory_peak - service.idle_memory
    assert grown <= MEMORY_BOUND, f"the service grew by {grown >> 20} MiB"
    # What the attacker's sessions started is gone; the pool refills to its usual size (a
    # kernel is a few processes, or one container; a refill may be under way).
    deadline = time.monotonic() + 60
    while True:
        now = (len(service.kernel_processes()), len(service.containers()))
        if now[0] <= baseline[0] + 6 and now[1] <= baseline[1] + 2:
            break
        assert time.monotonic() < deadline, f"processes, containers: {now}, before: {baseline}"
        time.sleep(0.5)


async def execute(client: httpx.AsyncClient, sid: str, code: str, timeout: float = 30) -> dict:
    """Run code in a session; the Execution as JSON (the HTTP status must be 200)."""
    response = await client.post(
        f"/v1/sessions/{sid}/execute", json={"code": code, "timeout": timeout}
    )
    assert response.status_code == 200, response.text
    return response.json()


async def new_session(client: httpx.AsyncClient, **body) -> str:
    response = await client.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]
