"""The self-hosted deployment (Dockerfile + docker-compose.yml) on the real engine.

Builds the service image (scripts/build-images.sh: seconds when nothing changed; the kernel
image is the one the other Docker tests use), brings a compose project of its own up, waits for
the health check, runs code through the SDK (state across calls, a plot saved and downloaded),
checks that stopping the service, gracefully or not, leaves no kernel container behind once it
is back, and that `down -v` leaves no container, network or volume of ours.

Works with `docker compose` (v2) and `docker-compose` (v1). Skips only where require_docker()
does; a missing compose command is a failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import DOCKER_RUNTIME, IMAGE, require_docker

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
SERVICE_IMAGE = os.environ.get("KERNELBOX_SERVICE_IMAGE", "kernelbox:latest")
HEALTHY_WITHIN = 120.0  # seconds, on a loaded 2-core machine

# Labels: compose's on what it made, the Docker backend's on kernel containers.
PROJECT_LABEL = "com.docker.compose.project"
KERNEL_OWNER_LABEL = "kernelbox.container"  # the service container that started the kernel

PLOT = """
import matplotlib.pyplot as plt
fig, ax = plt.subplots()
ax.plot(range(10), [v * v for v in range(10)])
fig.savefig("plot.png")
plt.show()
print(x * 2)
"""


def compose_command() -> list[str]:
    for command in (["docker", "compose"], ["docker-compose"]):
        try:
            subprocess.run([*command, "version"], capture_output=True, check=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        return command
    pytest.fail("neither `docker compose` nor `docker-compose` is installed")


class Deployment:
    """One compose project of docker-compose.yml, named uniquely for this test run."""

    def __init__(self) -> None:
        import docker

        self.docker = docker.from_env()
        self.command = compose_command()
        self.project = f"kbtest{uuid.uuid4().hex[:10]}"
        self.api_key = secrets.token_urlsafe(24)
        self.env = {
            **os.environ,
            "KERNELBOX_SERVICE_IMAGE": SERVICE_IMAGE,
            "KERNELBOX_IMAGE": IMAGE,
            "KERNELBOX_API_KEY": self.api_key,
            "KERNELBOX_PUBLISHED_PORT": "0",  # any free port, on loopback (the default bind)
            "KERNELBOX_MIN_IDLE": "1",
            "KERNELBOX_MAX_SESSIONS": "4",
            "KERNELBOX_MEMORY_MB": "512",
            "KERNELBOX_CPUS": "1",
            "KERNELBOX_PIDS": "128",
        }
        self.service_ids: set[str] = set()  # every service container seen (one per create)

    def compose(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run(
            [*self.command, "-p", self.project, "-f", str(REPO / "docker-compose.yml"), *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(self.command)} {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}\n{self.logs()}"
            )
        return proc.stdout

    def logs(self) -> str:
        try:
            return self.service().logs(tail=60).decode(errors="replace")
        except Exception:
            return ""

    def service(self):
        found = self.docker.containers.list(
            all=True, filters={"label": [f"{PROJECT_LABEL}={self.project}"]}
        )
        assert len(found) == 1, [c.name for c in found]
        self.service_ids.add(found[0].id)
        return found[0]

    def wait_healthy(self, timeout: float = HEALTHY_WITHIN) -> float:
        """Seconds until Docker's health check (GET /healthz) passes."""
        start = time.monotonic()
        while True:
            container = self.service()
            state = container.attrs["State"]
            health = (state.get("Health") or {}).get("Status")
            if health == "healthy":
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"not healthy after {timeout} s: {state}\n{self.logs()}")
            time.sleep(0.25)

    @property
    def url(self) -> str:
        ports = self.service().attrs["NetworkSettings"]["Ports"]["8000/tcp"]
        assert ports, "port 8000 is not published"
        assert ports[0]["HostIp"] == "127.0.0.1", ports  # loopback by default
        return f"http://127.0.0.1:{ports[0]['HostPort']}"

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=60
        )

    def kernels(self, service_id: str | None = None) -> list:
        """Kernel containers (running or not) started by this deployment's service."""
        ids = [service_id] if service_id else sorted(self.service_ids)
        found = []
        for owner in ids:
            found += self.docker.containers.list(
                all=True,
                filters={"label": [f"{KERNEL_OWNER_LABEL}={owner}"]},
                ignore_removed=True,  # one being removed right now
            )
        return found

    def new_session(self) -> str:
        with self.http() as http:
            response = http.post("/v1/sessions", json={})
            assert response.status_code == 201, response.text
            session_id = response.json()["id"]
            ran = http.post(f"/v1/sessions/{session_id}/execute", json={"code": "y = 1"})
            assert ran.json()["status"] == "ok", ran.text
            return session_id

    def leftovers(self) -> dict[str, list[str]]:
        label = {"label": [f"{PROJECT_LABEL}={self.project}"]}
        prefix = (f"{self.project}_", f"{self.project}-")
        return {
            "containers": [
                c.name
                for c in self.docker.containers.list(all=True, filters=label, ignore_removed=True)
            ]
            + [c.name for c in self.kernels()],
            "networks": [
                n.name
                for n in self.docker.networks.list()
                if n.name.startswith(prefix)
                or (n.attrs.get("Labels") or {}).get(PROJECT_LABEL) == self.project
            ],
            "volumes": [
                v.name
                for v in self.docker.volumes.list()
                if v.name.startswith(prefix)
                or (v.attrs.get("Labels") or {}).get(PROJECT_LABEL) == self.project
            ],
        }

    def remove_everything(self) -> None:
        """Safety net after a failure: nothing of this project may outlive the test run."""
        try:
            self.compose("down", "-v", "--remove-orphans", "-t", "30", timeout=180)
        except Exception:
            pass
        for kernel in self.kernels():
            try:
                kernel.remove(force=True)
            except Exception:
                pass


@pytest.fixture(scope="module")
def deployment():
    require_docker()
    assert shutil.which("docker"), "the docker command-line client is needed"
    build = subprocess.run(
        [str(REPO / "scripts" / "build-images.sh"), "service"],
        env={**os.environ, "SERVICE_IMAGE": SERVICE_IMAGE},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    d = Deployment()
    try:
        d.compose("up", "-d")
        d.up_to_healthy = d.wait_healthy()
        print(f"compose up -> healthy in {d.up_to_healthy:.1f} s")
        yield d
    finally:
        d.remove_everything()


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_code_runs_through_the_sdk(deployment):
    from kernelbox import Client

    assert deployment.up_to_healthy < HEALTHY_WITHIN
    with httpx.Client(base_url=deployment.url, timeout=30) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.post("/v1/sessions", json={}).status_code == 401  # the key is needed

    with (
        Client(base_url=deployment.url, api_key=deployment.api_key) as client,
        client.create_session() as session,
    ):
        first = session.execute("x = 21")
        assert first.status == "ok", first
        second = session.execute(PLOT, timeout=60)
        assert second.status == "ok", second
        assert second.stdout.strip() == "42"  # state kept between the two calls
        assert [i.path for i in second.images] == ["outputs/fig-001.png"]
        figure = session.download(second.images[0])
        saved = session.download("plot.png")
        # The service holds the Docker socket; the kernel sees neither it nor a network.
        probe = session.execute(
            "import os, socket\n"
            "print(os.path.exists('/var/run/docker.sock'), "
            "[n for _, n in socket.if_nameindex()])"
        )
        assert probe.stdout.strip() == "False ['lo']", probe
        # Kernels run under the runtime asked for (KERNELBOX_DOCKER_RUNTIME, through compose).
        runtimes = {k.attrs["HostConfig"]["Runtime"] for k in deployment.kernels()}
        assert runtimes == {DOCKER_RUNTIME or "runc"}, runtimes
    assert figure.startswith(b"\x89PNG\r\n\x1a\n") and len(figure) > 1000
    assert saved.startswith(b"\x89PNG\r\n\x1a\n") and len(saved) > 1000


def test_service_runs_as_a_user_with_no_capabilities(deployment):
    service = deployment.service()
    # PID 1 is tini (root); its child is the service, which dropped to uid 1000.
    read_status = "read pid < /proc/1/task/1/children; grep -E '^(Uid|CapEff|NoNewPrivs)' "
    code, out = service.exec_run(["sh", "-c", read_status + "/proc/$pid/status"])
    assert code == 0, out
    status = dict(line.split(":", 1) for line in out.decode().splitlines())
    assert status["Uid"].split()[:2] == ["1000", "1000"], status
    assert int(status["CapEff"], 16) == 0, status
    assert status["NoNewPrivs"].strip() == "1", status


def end_sessions(deployment) -> None:
    """Delete every session of the key: the deployment is shared, its slots are few."""
    with deployment.http() as http:
        for session in http.get("/v1/sessions").json():
            assert http.delete(f"/v1/sessions/{session['id']}").status_code == 204


def session_intact(deployment, session_id: str) -> dict:
    """The session still answers, with its variable (`y = 1`, set by new_session), and its
    kernel was not replaced."""
    with deployment.http() as http:
        ran = http.post(f"/v1/sessions/{session_id}/execute", json={"code": "print(y)"})
    body = ran.json()
    assert ran.status_code == 200 and body["stdout"] == "1\n", body
    assert not body.get("kernel_restarted"), body
    return body


def test_sigterm_keeps_the_sessions_kernels_and_removes_the_rest(deployment):
    service = deployment.service()
    session_id = deployment.new_session()
    # the session's and a warm one (the pool refills in the background)
    assert wait_for(lambda: len(deployment.kernels(service.id)) >= 2, 60), deployment.kernels()
    deployment.compose("stop")  # SIGTERM: a graceful shutdown
    # The warm kernels are removed by the service before it exits (the engine may still be
    # finishing a removal); the session's keeps running for the next start.
    assert wait_for(lambda: len(deployment.kernels(service.id)) == 1, 5), deployment.kernels()
    assert deployment.kernels(service.id)[0].status == "running"
    deployment.compose("start")
    deployment.wait_healthy()
    session_intact(deployment, session_id)
    end_sessions(deployment)


def test_compose_restart_keeps_a_live_session(deployment):
    session_id = deployment.new_session()
    with deployment.http() as http:
        wrote = http.post(
            f"/v1/sessions/{session_id}/execute",
            json={"code": "open('kept.txt', 'w').write('still here')"},
        )
        assert wrote.json()["status"] == "ok", wrote.text
    started = deployment.service().attrs["State"]["StartedAt"]
    deployment.compose("restart")
    assert deployment.service().attrs["State"]["StartedAt"] != started, "not restarted"
    deployment.wait_healthy()
    session_intact(deployment, session_id)
    with deployment.http() as http:
        got = http.get(f"/v1/sessions/{session_id}/files/kept.txt")
        assert got.status_code == 200 and got.text == "still here", got.text
        info = http.get(f"/v1/sessions/{session_id}").json()
        assert info["execution_count"] == 3, info
        # another key is still another owner
        other = httpx.get(
            f"{deployment.url}/v1/sessions/{session_id}",
            headers={"Authorization": "Bearer not-the-key"},
            timeout=30,
        )
        assert other.status_code == 401, other.text
    end_sessions(deployment)


def test_a_crashed_service_is_restarted_and_keeps_its_sessions(deployment):
    service = deployment.service()
    session_id = deployment.new_session()
    before = {k.id for k in deployment.kernels(service.id)}
    assert before
    started = service.attrs["State"]["StartedAt"]
    # SIGKILL to the service process (tini's child): no clean-up runs; the container exits
    # and Docker restarts it (restart: unless-stopped).
    kill = "read pid < /proc/1/task/1/children; kill -9 $pid"
    code, out = service.exec_run(["sh", "-c", kill], user="0")
    assert code == 0, out
    deadline = time.monotonic() + HEALTHY_WITHIN
    while deployment.service().attrs["State"]["StartedAt"] == started:
        assert time.monotonic() < deadline, "the service was not restarted"
        time.sleep(0.25)
    deployment.wait_healthy()
    session_intact(deployment, session_id)
    # Healthy means the lifespan ran, and with it the orphan reaping: of the dead process's
    # kernels only its sessions' are left (the warm ones were orphans).
    with deployment.http() as http:
        live = {s["id"] for s in http.get("/v1/sessions").json()}
    left = before & {k.id for k in deployment.kernels(service.id)}
    assert session_id in live and len(left) <= len(live), (left, live)
    assert deployment.new_session()
    end_sessions(deployment)


def test_a_killed_container_is_cleaned_up_by_the_next_start(deployment):
    service = deployment.service()
    session_id = deployment.new_session()
    before = {k.id for k in deployment.kernels(service.id)}
    service.kill()  # SIGKILL to the whole container: it stays down, its kernels stay behind
    assert before <= {k.id for k in deployment.kernels(service.id)}
    deployment.compose("up", "-d")
    deployment.wait_healthy()
    session_intact(deployment, session_id)
    with deployment.http() as http:
        live = {s["id"] for s in http.get("/v1/sessions").json()}
    assert len(before & {k.id for k in deployment.kernels()}) <= len(live)
    end_sessions(deployment)


def test_down_leaves_nothing_behind(deployment):
    deployment.new_session()
    assert deployment.kernels()
    # Sessions outlive `down` (their kernels keep running for the next `up`): ending them is
    # deleting them.
    end_sessions(deployment)
    deployment.compose("down", "-v")
    assert deployment.leftovers() == {"containers": [], "networks": [], "volumes": []}
