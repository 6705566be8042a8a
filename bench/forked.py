"""Forked kernels against spawned ones, side by side in one run (local backend, root, bwrap):

- cold session ready (pool empty): `KernelSession.start` until the kernel answers, forked from
  the warm template vs a new interpreter in a new sandbox, alternating round by round;
- PSS per idle session at 1, 16 and 64 sessions: forked, the whole template sandbox's tree
  (template and every kernel) divided by the sessions; spawned, the sum of each kernel's tree;
  and from that the idle sessions 8 GiB holds;
- `/run_jupyter` with two cells against a real `kernelbox serve`: requests/s and p50/p99 at
  concurrency 8 and 32, a kernel forked per request vs the pool path (spawned kernels).

With `--backend docker`, only `/run_jupyter` (Docker sessions keep a container each): a kernel
forked per request in the kernel-template container vs the pool path (a warm container per
request, `KERNELBOX_DOCKER_THROWAWAY=container`).

    .venv/bin/python -m bench.forked   # --rounds 5 --sessions 1,16,64 --requests 96
    .venv/bin/python -m bench.forked --backend docker   # KERNELBOX_DOCKER_RUNTIME for runsc
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import start_server, stats_ms, wait_ready
from kernelbox_server.sandbox.backends.launch import tree_pss
from kernelbox_server.sandbox.backends.local import LocalBackend
from kernelbox_server.sandbox.session import KernelSession, SessionOptions
from tests.server import free_port

MIB = 1024**2
CELLS = ["import numpy as np\nx = np.arange(10)", "print(int(x.sum()))"]


async def _session(backend: LocalBackend, root: Path) -> KernelSession:
    workdir = Path(tempfile.mkdtemp(dir=root)) / "work"
    workdir.mkdir()
    os.chmod(workdir.parent, 0o755)
    return await KernelSession.start(backend, workdir, options=SessionOptions())


async def cold_ready(backends: dict[str, LocalBackend], root: Path, rounds: int) -> dict:
    samples: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(rounds):
        for name, backend in backends.items():
            started = time.perf_counter()
            session = await _session(backend, root)
            samples[name].append(time.perf_counter() - started)
            await session.close()
    return {name: statistics.median(s) * 1000 for name, s in samples.items()}


async def idle_pss(backend: LocalBackend, root: Path, counts: list[int], forked: bool) -> dict:
    sessions: list[KernelSession] = []
    out = {}
    try:
        for count in counts:
            while len(sessions) < count:
                sessions.append(await _session(backend, root))
            await asyncio.sleep(3)  # idle: start-up's garbage collected, pages settled
            if forked:
                assert backend.template.handle is not None
                total = tree_pss(backend.template.handle.pid) or 0
            else:
                total = sum(s.kernel.proc.memory_pss() or 0 for s in sessions)
            out[count] = total / count / MIB
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    return out


async def run_jupyter(settings: dict, concurrency: list[int], requests: int) -> dict:
    port = free_port()
    data = tempfile.mkdtemp(prefix="kb-bench-")
    server = start_server(port, data_dir=data, max_sessions=64, **settings)
    url = f"http://127.0.0.1:{port}"
    out = {}
    try:
        await wait_ready(url, idle=2)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:

            async def one() -> float:
                started = time.perf_counter()
                resp = await client.post("/run_jupyter", json={"cells": CELLS, "total_timeout": 60})
                body = resp.json()
                assert resp.status_code == 200 and body["status"] == "Success", body
                assert body["cells"][1]["stdout"] == "45\n", body
                return time.perf_counter() - started

            for _ in range(4):  # warm-up: the template is up, the pool full
                await one()
            await asyncio.sleep(3)
            for c in concurrency:
                latencies: list[float] = []
                queue = list(range(requests))

                async def worker(queue: list[int], latencies: list[float]) -> None:
                    while queue:
                        queue.pop()
                        latencies.append(await one())

                started = time.perf_counter()
                await asyncio.gather(*(worker(queue, latencies) for _ in range(c)))
                elapsed = time.perf_counter() - started
                out[c] = {"rps": requests / elapsed, **stats_ms(latencies)}
                await wait_ready(url, idle=2)
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(data)
    return out


JUPYTER_PATHS = {
    "local": {"forked": {"local_kernels": "forked"}, "pool": {"local_kernels": "spawned"}},
    "docker": {
        "forked": {"backend": "docker", "docker_throwaway": "forked"},
        "pool": {"backend": "docker", "docker_throwaway": "container"},
    },
}


async def main(args: argparse.Namespace) -> None:
    concurrency = [int(n) for n in args.concurrency.split(",")]
    if args.backend == "local":
        await sessions(args)
    paths = JUPYTER_PATHS[args.backend]
    results = {k: await run_jupyter(v, concurrency, args.requests) for k, v in paths.items()}
    pool = "pool (spawned)" if args.backend == "local" else "pool (a container each)"
    for c in concurrency:
        f, s = results["forked"][c], results["pool"][c]
        print(
            f"/run_jupyter {args.backend} c={c}: forked {f['rps']:.1f} req/s p50 {f['p50']:.0f} "
            f"ms p99 {f['p99']:.0f} ms; {pool} {s['rps']:.1f} req/s p50 {s['p50']:.0f} ms "
            f"p99 {s['p99']:.0f} ms; {f['rps'] / s['rps']:.1f}x"
        )


async def sessions(args: argparse.Namespace) -> None:
    """Cold session ready and idle PSS, forked vs spawned (local backend)."""
    counts = [int(n) for n in args.sessions.split(",")]
    root = Path(tempfile.mkdtemp(prefix="kb-bench-forked-"))
    os.chmod(root, 0o755)
    forked, spawned = LocalBackend(kernels="forked"), LocalBackend(kernels="spawned")
    try:
        assert await forked.template.ready() is not None, forked.template.last_error
        ready = await cold_ready({"forked": forked, "spawned": spawned}, root, args.rounds)
        print(
            f"cold session ready (median of {args.rounds}): forked {ready['forked']:.0f} ms, "
            f"spawned {ready['spawned']:.0f} ms ({ready['spawned'] / ready['forked']:.1f}x)"
        )
        pss_f = await idle_pss(forked, root, counts, forked=True)
        spawned_counts = [n for n in counts if n <= args.spawned_max]
        pss_s = await idle_pss(spawned, root, spawned_counts, forked=False)
        for n in counts:
            s = f"{pss_s[n]:.1f}" if n in pss_s else "-"
            print(f"PSS per idle session at {n}: forked {pss_f[n]:.1f} MiB, spawned {s} MiB")
        biggest = max(counts)
        print(
            f"idle sessions in 8 GiB: forked {int(8 * 1024 / pss_f[biggest])} "
            f"(at {pss_f[biggest]:.1f} MiB), spawned "
            f"{int(8 * 1024 / pss_s[max(pss_s)])} (at {pss_s[max(pss_s)]:.1f} MiB)"
        )
    finally:
        await forked.close()
        await spawned.close()
        shutil.rmtree(root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=sorted(JUPYTER_PATHS), default="local")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sessions", default="1,16,64")
    parser.add_argument("--spawned-max", type=int, default=64)
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--requests", type=int, default=96)
    asyncio.run(main(parser.parse_args()))
