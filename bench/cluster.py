"""The Ray mode on a multi-node Ray cluster on this machine, beside one plain service:

- `/run_code` throughput (`print(1 + 1)`) through a Ray-mode front with 1, 2, then 3 kernel
  hosts (nodes added one at a time), and through a plain service in the same run;
- sessions spread over three hosts (how many each got of `--sessions` creates);
- per-call overhead of the extra hop: `x += 1` in a session, through the plain service, through
  the Ray-mode front (HTTP, then the host), and through the Python API (no HTTP), rounds
  alternating so that other load weighs on all alike.

Every node here is a raylet on the same 2-core machine, so adding hosts shows the overhead and
that work spreads, not a speed-up: there is no more CPU to spread it over.

    .venv/bin/python -m bench.cluster   # --requests 200 --concurrency 16 --calls 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import ray
from ray.cluster_utils import Cluster

from bench.common import start_server, stats_ms
from kernelbox_server.service.cluster.engine import RayEngine, open_ray_engine, stop_hosts
from kernelbox_server.service.cluster.host import HOST_RESOURCE, NAMESPACE, host_name
from kernelbox_server.service.settings import Settings
from tests.server import free_port

NODE = {"num_cpus": 1, "resources": {HOST_RESOURCE: 1}}
SETTINGS = {"min_idle": 1, "max_sessions": 64, "run_code_templates": 1, "local_sandbox": "bwrap"}


async def wait_ready(url: str, hosts: int = 0, timeout: float = 300) -> None:
    """Until the service is ready (and, for a front, has `hosts` hosts ready)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = await client.get("/readyz")
                ready = [h for h in response.json().get("hosts", {}).values() if h.get("ready")]
                if response.status_code == 200 and len(ready) >= hosts:
                    return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} not ready with {hosts} hosts in {timeout} s")


async def run_code_rate(url: str, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []
    errors = 0
    queue = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for _ in queue:
            started = time.perf_counter()
            response = await client.post(
                "/run_code", json={"code": "print(1 + 1)", "language": "python"}
            )
            body = response.json()
            if response.status_code != 200 or body["run_result"]["stdout"] != "2\n":
                errors += 1
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await client.post("/run_code", json={"code": "1", "language": "python"})  # warm
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"rps": requests / wall, **stats_ms(latencies), "errors": errors}


async def call_latency(step: Callable[[], Awaitable[None]], calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await step()
        samples.append(time.perf_counter() - started)
    return samples


async def http_session(url: str) -> tuple[httpx.AsyncClient, Callable[[], Awaitable[None]]]:
    client = httpx.AsyncClient(base_url=url, timeout=60)
    sid = (await client.post("/v1/sessions", json={})).json()["id"]
    await client.post(f"/v1/sessions/{sid}/execute", json={"code": "x = 0"})

    async def step() -> None:
        response = await client.post(f"/v1/sessions/{sid}/execute", json={"code": "x += 1"})
        assert response.json()["status"] == "ok", response.text

    return client, step


async def api_session(kernels: RayEngine) -> Callable[[], Awaitable[None]]:
    session = await kernels.create("bench")
    await kernels.execute(session.id, "bench", "x = 0")

    async def step() -> None:
        execution = await kernels.execute(session.id, "bench", "x += 1")
        assert execution.status == "ok", execution

    return step


async def node_loss(cluster: Cluster, url: str, kernels: RayEngine) -> None:
    """How long until a lost node's session answers `died`, and what it answers meanwhile."""
    node = cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    await wait_ready(url, hosts=4)
    lost_host = host_name(node.node_id)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        # The new host has the most room (or shares it): sessions soon land there.
        ids: list[str] = []
        doomed = None
        while doomed is None and len(ids) < 8:
            ids.append((await client.post("/v1/sessions", json={})).json()["id"])
            if (await kernels.directory.locate.remote(ids[-1])).host == lost_host:
                doomed = ids[-1]
        assert doomed is not None, "no session went to the new node's host"
        await client.post(f"/v1/sessions/{doomed}/execute", json={"code": "x = 1"})
        started = time.perf_counter()
        cluster.remove_node(node)
        answers: dict[str, int] = {}
        while True:
            response = await client.post(f"/v1/sessions/{doomed}/execute", json={"code": "x"})
            ok = response.status_code == 200
            got = response.json()["status"] if ok else f"HTTP {response.status_code}"
            answers[got] = answers.get(got, 0) + 1
            if got == "died":
                break
            await asyncio.sleep(0.1)
        took = time.perf_counter() - started
        print(f"\n## Node loss\n\na lost node's session answered `died` {took:.1f} s after its")
        print(f"raylet was killed; answers meanwhile (every 0.1 s): {answers}")
        for sid in ids:
            await client.delete(f"/v1/sessions/{sid}")


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="kb-bench-cluster-"))
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    procs = []
    try:
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        plain_port, front_port = free_port(), free_port()
        plain_url, front_url = f"http://127.0.0.1:{plain_port}", f"http://127.0.0.1:{front_port}"
        procs.append(start_server(plain_port, data_dir=root / "plain", **SETTINGS))
        procs.append(
            start_server(
                front_port,
                data_dir=root / "ray",
                cluster="ray",
                ray_address=cluster.address,
                **SETTINGS,
            )
        )
        await wait_ready(plain_url)
        await wait_ready(front_url, hosts=1)

        print("## /run_code, print(1 + 1)")
        print(f"{args.requests} requests at concurrency {args.concurrency}\n")
        print(
            "| | hosts | req/s | p50 ms | p99 ms | errors |\n| --- | --- | --- | --- | --- | --- |"
        )
        plain = await run_code_rate(plain_url, args.requests, args.concurrency)
        print(
            f"| plain service | - | {plain['rps']:.1f} | {plain['p50']:.0f} | "
            f"{plain['p99']:.0f} | {plain['errors']} |"
        )
        for hosts in (1, 2, 3):
            if hosts > 1:
                cluster.add_node(**NODE)
                cluster.wait_for_nodes()
                await wait_ready(front_url, hosts=hosts)
            rate = await run_code_rate(front_url, args.requests, args.concurrency)
            print(
                f"| Ray mode front | {hosts} | {rate['rps']:.1f} | {rate['p50']:.0f} | "
                f"{rate['p99']:.0f} | {rate['errors']} |"
            )

        async with open_ray_engine(Settings(cluster="ray")) as kernels:
            before = await kernels.directory.counts.remote()
            async with httpx.AsyncClient(base_url=front_url, timeout=120) as client:
                made = [
                    (await client.post("/v1/sessions", json={})).json()["id"]
                    for _ in range(args.sessions)
                ]
                after = await kernels.directory.counts.remote()
                spread = sorted(after.get(h, 0) - before.get(h, 0) for h in after)
                print(f"\n## Spread: {args.sessions} sessions over 3 hosts: {spread}\n")
                for sid in made:
                    await client.delete(f"/v1/sessions/{sid}")

            plain_client, plain_step = await http_session(plain_url)
            front_client, front_step = await http_session(front_url)
            api_step = await api_session(kernels)
            steps = {"plain service (HTTP)": plain_step, "Ray mode front (HTTP, then the host)":
                     front_step, "Ray mode, Python API (no HTTP)": api_step}  # fmt: skip
            samples: dict[str, list[float]] = {name: [] for name in steps}
            for _ in range(args.rounds):
                for name, step in steps.items():
                    samples[name] += await call_latency(step, args.calls // args.rounds)
            await plain_client.aclose()
            await front_client.aclose()
            print(f"## Per call: `x += 1` in a session, {args.calls} calls each, interleaved\n")
            print("| path | p50 ms | p99 ms | mean ms |\n| --- | --- | --- | --- |")
            for name, got in samples.items():
                s = stats_ms(got)
                print(f"| {name} | {s['p50']:.1f} | {s['p99']:.1f} | {s['mean']:.1f} |")
            base = stats_ms(samples["plain service (HTTP)"])["p50"]
            hop = stats_ms(samples["Ray mode front (HTTP, then the host)"])["p50"]
            print(f"\nthe hop adds {hop - base:.1f} ms at p50 ({hop / base:.2f}x)")
            await node_loss(cluster, front_url, kernels)
            await stop_hosts()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
