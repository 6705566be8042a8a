"""What the local backend's sandbox costs: bwrap-sandboxed kernels and fork-server runs against
plain local ones, side by side in one run, the two series alternating round by round so other
load on the machine weighs on both alike.

- cold kernel start: `KernelSession.start` on a `LocalBackend` in this process, to ready with
  the preload done;
- warm acquire: `POST /v1/sessions` then the first `x = 1`, over HTTP, the pool warm (it is
  waited for before each sample);
- `x = 1` latency over HTTP, on one session;
- a plot: `plt.plot(...); plt.show()` over HTTP, the PNG saved into the session's directory;
- `/run_code` throughput at concurrency 64 with data-stack code (bench/runcode.py's client and
  check), and the CPU per run of the service's whole process tree (service, templates, runs;
  not the kernel threads that tear namespaces down).

Two `kernelbox serve` processes, one with KERNELBOX_LOCAL_SANDBOX=bwrap, one with none.

    python -m bench.isolation_local [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import httpx
import psutil

from bench.common import row, start_server, stats_ms, timed, wait_ready
from bench.runcode import STACK_CODE, Connection, drive, kernelbox_run
from kernelbox_server.sandbox.backends.local import LocalBackend
from kernelbox_server.sandbox.session import KernelSession

MODES = ("none", "bwrap")  # KERNELBOX_LOCAL_SANDBOX of each series
WARM = 3


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process tree, with the children its processes have reaped."""
    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


async def execute_ok(client: httpx.AsyncClient, sid: str, code: str) -> dict:
    response = await client.post(f"/v1/sessions/{sid}/execute", json={"code": code})
    body = response.json()
    if response.status_code != 200 or body["status"] != "ok":
        raise RuntimeError(f"execute failed: {response.status_code} {response.text[:300]}")
    return body


class Series:
    def __init__(self, mode: str, port: int, data_dir: Path) -> None:
        self.mode, self.port = mode, port
        self.url = f"http://127.0.0.1:{port}"
        self.server = start_server(
            port,
            local_sandbox=mode,
            min_idle=WARM,
            max_sessions=16,
            data_dir=data_dir / mode,
            run_code_templates=os.cpu_count() or 2,
        )
        self.backend = LocalBackend(sandbox=mode)  # type: ignore[arg-type]
        self.samples: dict[str, list[float]] = {}
        self.runs = self.run_wall = self.run_cpu = 0.0
        self.errors = 0

    def add(self, name: str, seconds: float) -> None:
        self.samples.setdefault(name, []).append(seconds)

    async def round(self, args: argparse.Namespace, root: Path, index: int) -> None:
        for i in range(args.cold):
            holder: list[KernelSession] = []

            async def cold(path=root / f"cold-{self.mode}-{index}-{i}", holder=holder) -> None:
                holder.append(await KernelSession.start(self.backend, path))

            self.add("cold kernel start", await timed(cold))
            await holder[0].close()
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            for _ in range(args.warm):
                await wait_ready(self.url, idle=WARM)
                sid = ""

                async def acquire() -> None:
                    nonlocal sid
                    sid = (await client.post("/v1/sessions", json={})).json()["id"]
                    await execute_ok(client, sid, "x = 1")

                self.add("warm acquire (create + first `x = 1`)", await timed(acquire))
                await client.delete(f"/v1/sessions/{sid}")
            await wait_ready(self.url, idle=WARM)
            sid = (await client.post("/v1/sessions", json={})).json()["id"]
            for _ in range(args.executes):
                self.add("`x = 1`", await timed(lambda: execute_ok(client, sid, "x = 1")))
            for _ in range(args.plots):

                async def plot() -> None:
                    body = await execute_ok(client, sid, "plt.plot([1, 3, 2]); plt.show()")
                    if not body["images"]:
                        raise RuntimeError(f"no image: {body}")

                self.add("a plot (PNG saved)", await timed(plot))
            await client.delete(f"/v1/sessions/{sid}")
        pool: asyncio.Queue[Connection] = asyncio.Queue()
        for _ in range(args.concurrency):
            pool.put_nowait(Connection("127.0.0.1", self.port))
        try:
            before = tree_cpu(self.server.pid)
            wall, latencies, errors = await drive(
                args.requests, args.concurrency, kernelbox_run(pool, STACK_CODE)
            )
            self.run_cpu += tree_cpu(self.server.pid) - before
        finally:
            while not pool.empty():
                pool.get_nowait().close()
        self.runs += len(latencies)
        self.run_wall += wall
        self.errors += errors
        self.samples.setdefault("/run_code latency", []).extend(latencies)

    async def close(self) -> None:
        await self.backend.close()
        self.server.terminate()
        self.server.wait(timeout=60)


async def main(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    series = [Series(mode, args.port + i, data_dir) for i, mode in enumerate(MODES)]
    try:
        for s in series:
            # Not measured: the first kernel of a backend builds matplotlib's font cache, and
            # the templates start on first use.
            await (await KernelSession.start(s.backend, data_dir / f"first-{s.mode}")).close()
            await wait_ready(s.url, idle=WARM)
            warmup: asyncio.Queue[Connection] = asyncio.Queue()
            warmup.put_nowait(Connection("127.0.0.1", s.port))
            await drive(8, 1, kernelbox_run(warmup, STACK_CODE))
            warmup.get_nowait().close()
        for index in range(args.rounds):
            for s in series:
                await s.round(args, data_dir, index)
    finally:
        for s in series:
            await s.close()
        shutil.rmtree(data_dir, ignore_errors=True)

    plain, boxed = series
    print(
        f"### Local backend: bwrap sandbox vs plain processes ({args.rounds} alternating "
        f"rounds, {os.cpu_count()} cores)\n"
    )
    print(row("measure", "plain p50 ms", "sandboxed p50 ms", "plain p99", "sandboxed p99", "n"))
    print(row("---", "---", "---", "---", "---", "---"))
    for name, samples in plain.samples.items():
        p, b = stats_ms(samples), stats_ms(boxed.samples[name])
        print(
            row(
                name,
                f"{p['p50']:.1f}",
                f"{b['p50']:.1f}",
                f"{p['p99']:.1f}",
                f"{b['p99']:.1f}",
                len(samples),
            )
        )
    print()
    for s in series:
        rate = s.runs / s.run_wall
        cpu = 1000 * s.run_cpu / max(s.runs, 1)
        print(
            f"- `/run_code` ({s.mode}): {rate:.1f} req/s at concurrency {args.concurrency}, "
            f"{cpu:.1f} ms CPU per run, {s.errors} errors"
        )
    ratio = (boxed.runs / boxed.run_wall) / (plain.runs / plain.run_wall)
    print(f"- `/run_code` throughput sandboxed / plain: **{ratio:.2f}x**")
    for name in ("cold kernel start", "warm acquire (create + first `x = 1`)", "`x = 1`"):
        r = stats_ms(boxed.samples[name])["p50"] / stats_ms(plain.samples[name])["p50"]
        print(f"- {name}, sandboxed / plain (p50): {r:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8752)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", type=int, default=2, help="cold starts per round")
    parser.add_argument("--warm", type=int, default=4, help="warm acquires per round")
    parser.add_argument("--executes", type=int, default=100, help="`x = 1` per round")
    parser.add_argument("--plots", type=int, default=10, help="plots per round")
    parser.add_argument("--requests", type=int, default=700, help="/run_code per round")
    parser.add_argument("--concurrency", type=int, default=64)
    asyncio.run(main(parser.parse_args()))
