"""A Ray cluster on this machine with kernelbox fronts over it, for the Ray-mode tests.

`ray.cluster_utils.Cluster` starts real raylets (each a node with an id of its own, all on this
machine), each offering `kernelbox_host`; fronts are real `kernelbox serve` processes with
KERNELBOX_CLUSTER=ray; this process joins the cluster as a driver, as an RL trainer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import ray
from ray.cluster_utils import Cluster

from kernelbox_server.service.cluster.engine import stop_hosts
from kernelbox_server.service.cluster.host import HOST_RESOURCE, NAMESPACE
from tests.server import free_port

KEY_A = "ray-key-a"
KEY_B = "ray-key-b"
NODE = {"num_cpus": 1, "resources": {HOST_RESOURCE: 1}}


@dataclass
class Front:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def client(self, key: str = KEY_A) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        )

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class RayDeployment:
    cluster: Cluster
    nodes: int
    data_dir: Path
    #: KERNELBOX_* settings of every front (and so of the hosts they start)
    settings: dict[str, str] = field(default_factory=dict)
    fronts: list[Front] = field(default_factory=list)

    def start_front(self) -> Front:
        port = free_port()
        log_path = self.data_dir.parent / f"front-{port}.log"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KERNELBOX_")},
            "KERNELBOX_CLUSTER": "ray",
            "KERNELBOX_RAY_ADDRESS": self.cluster.address,
            "KERNELBOX_PORT": str(port),
            "KERNELBOX_DATA_DIR": str(self.data_dir),
            "KERNELBOX_API_KEY": f"{KEY_A},{KEY_B}",
            "KERNELBOX_LOCAL_SANDBOX": os.environ.get("KERNELBOX_LOCAL_SANDBOX", "auto"),
            "KERNELBOX_ALLOW_WEAK_ISOLATION": "1",  # a machine without bwrap still tests this
            "KERNELBOX_MIN_IDLE": "1",
            "KERNELBOX_MAX_SESSIONS": "16",
            "KERNELBOX_RUN_CODE_TEMPLATES": "1",
            **self.settings,
        }
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kernelbox.cli", "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        front = Front(proc, f"http://127.0.0.1:{port}", log_path)
        self.fronts.append(front)
        wait_for(lambda: _ready(front), 240, f"front {front.url} ready")
        return front


def _ready(front: Front) -> bool:
    if front.proc.poll() is not None:
        raise RuntimeError(f"the front exited: {front.log_tail()}")
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{front.url}/readyz", timeout=5).status_code == 200
    return False


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


@contextlib.contextmanager
def ray_deployment(nodes: int, fronts: int = 2, **settings: str) -> Iterator[RayDeployment]:
    """A cluster of `nodes` nodes, this process its driver, and `fronts` fronts; afterwards
    nothing of it is left (hosts stopped, cluster shut down, mounts and files removed)."""
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    with tempfile.TemporaryDirectory(prefix="kb-ray-") as tmp:
        deployment = RayDeployment(cluster, nodes, Path(tmp) / "data", settings)
        try:
            for _ in range(nodes - 1):
                cluster.add_node(**NODE)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
            for _ in range(fronts):
                deployment.start_front()
            yield deployment
        finally:
            for front in deployment.fronts:
                front.stop()
            if ray.is_initialized():
                asyncio.run(stop_hosts())
                ray.shutdown()
            cluster.shutdown()
            # A removed node's host was killed with its sessions' filesystems mounted (a lost
            # machine takes them along; here it is this machine's).
            unmount_under(Path(tmp))


def unmount_under(root: Path) -> None:
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in sorted(points, reverse=True):
        if point.startswith(f"{root}/"):
            subprocess.run(["umount", "-l", point], check=True)


def create(client: httpx.Client) -> str:
    response = client.post("/v1/sessions", json={})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def run(client: httpx.Client, session_id: str, code: str) -> dict:
    response = client.post(f"/v1/sessions/{session_id}/execute", json={"code": code})
    assert response.status_code == 200, response.text
    return response.json()
