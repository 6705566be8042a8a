"""Docker isolation benchmark: kernels under runc against kernels under runsc (gVisor), side by
side in one run, series alternating round by round so machine noise weighs on both alike:

1. cold kernel start (the engine's KernelSession.start: container, interpreter, data stack);
2. warm acquire: `POST /v1/sessions` + the first `x = 1` over HTTP, against one `kernelbox
   serve` per runtime whose pool is warm;
3. `x = 1`: the engine's KernelSession.execute and a raw jupyter_client round trip on the
   same kernel (what the kernel side costs, without the engine);
4. `/run_code` throughput of each service's fork server (data-stack code, as in bench.runcode);
5. memory of an idle kernel: PSS of the container's processes as the host's /proc shows them
   (runc: tini and the kernel; runsc: the Sentry and its stubs, the sandbox's whole cost, which
   shares no library pages with other sandboxes) and the container's memory cgroup usage.

    python -m bench.isolation_docker [--runtimes runc,runsc] [--plot docs/isolation_docker.png]

Needs the engine to have both runtimes (scripts/enable-gvisor.sh) and the kernel image
(KERNELBOX_IMAGE, default kernelbox-kernel:latest).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import raw_client, raw_roundtrip, row, start_server, stats_ms, timed, wait_ready
from bench.runcode import STACK_CODE, Connection, drive, kernelbox_run
from bench.service import http_execute
from kernelbox_server.sandbox.backends.docker import LABEL_KERNEL, LABEL_PID, DockerBackend
from kernelbox_server.sandbox.session import KernelSession


@dataclass
class Series:
    runtime: str
    backend: DockerBackend
    url: str = ""
    server_pid: int = 0
    cold: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    run_code: list[float] = field(default_factory=list)  # latencies
    run_code_wall: float = 0.0
    run_code_errors: int = 0
    run_code_cpu: float = 0.0  # seconds, the templates' containers (Sentry included)
    pss: int | None = None
    cgroup: int | None = None

    @property
    def run_code_rate(self) -> float:
        return len(self.run_code) / self.run_code_wall if self.run_code_wall else 0.0


def container_stats(backend: DockerBackend, container_id: str) -> dict:
    return backend.client.api.stats(container_id, stream=False, one_shot=True)


def cgroup_memory(backend: DockerBackend, container_id: str) -> int | None:
    """What the container's memory limit counts (the engine's own figure, page cache out)."""
    stats = container_stats(backend, container_id)["memory_stats"]
    usage = stats.get("usage")
    cache = stats.get("stats", {}).get("total_inactive_file") or stats.get("stats", {}).get(
        "inactive_file", 0
    )
    return usage - cache if usage else None


async def engine_phase(series: dict[str, Series], root: Path, args: argparse.Namespace) -> None:
    for i in range(args.cold_starts):  # cold starts alternate between runtimes
        for rt, s in series.items():
            holder: list[KernelSession] = []

            async def start(s=s, holder=holder, path=root / f"cold-{rt}-{i}"):
                holder.append(await KernelSession.start(s.backend, path))

            s.cold.append(await timed(start))
            await holder[0].close()
    sessions = {
        rt: await KernelSession.start(s.backend, root / f"x-{rt}") for rt, s in series.items()
    }
    raws = {rt: raw_client(sessions[rt].kernel.proc.connection_info) for rt in series}
    try:
        for rt in series:
            for _ in range(20):  # warm both paths
                await sessions[rt].execute("x = 1")
                await raw_roundtrip(raws[rt])
        for _ in range(args.rounds // 10):
            for rt, s in series.items():
                session, raw = sessions[rt], raws[rt]
                for _ in range(10):
                    s.engine.append(await timed(lambda session=session: session.execute("x = 1")))
                for _ in range(10):
                    s.raw.append(await timed(lambda raw=raw: raw_roundtrip(raw)))
        await asyncio.sleep(2)  # idle
        for rt, s in series.items():
            proc = sessions[rt].kernel.proc
            s.pss = proc.memory_pss()  # type: ignore[attr-defined]
            s.cgroup = await asyncio.to_thread(cgroup_memory, s.backend, proc.container_id)  # type: ignore[attr-defined]
    finally:
        for raw in raws.values():
            raw.stop_channels()
        for session in sessions.values():
            await session.close()


def templates_cpu(backend: DockerBackend, server_pid: int) -> float:
    """CPU seconds used so far by the fork-server template containers of one service."""
    total = 0
    mine = {"label": [f"{LABEL_PID}={server_pid}"]}
    for container in backend.client.containers.list(filters=mine):
        if container.labels.get(LABEL_KERNEL, "").startswith("fs"):
            total += container_stats(backend, container.id)["cpu_stats"]["cpu_usage"]["total_usage"]
    return total / 1e9


async def service_phase(series: dict[str, Series], args: argparse.Namespace) -> None:
    clients = {rt: httpx.AsyncClient(base_url=s.url, timeout=120) for rt, s in series.items()}
    pools: dict[str, asyncio.Queue[Connection]] = {}
    try:
        for s in series.values():
            await wait_ready(s.url, args.warm)
        for _ in range(args.ready_rounds):
            for rt, s in series.items():
                client = clients[rt]
                await wait_ready(s.url, args.warm)  # each acquire finds a warm kernel
                sid: list[str] = []

                async def acquire(client=client, sid=sid) -> None:
                    sid.append((await client.post("/v1/sessions", json={})).json()["id"])
                    await http_execute(client, sid[0])

                s.warm.append(await timed(acquire))
                await client.delete(f"/v1/sessions/{sid[0]}")
        for rt, s in series.items():
            port = int(s.url.rsplit(":", 1)[1])
            pools[rt] = asyncio.Queue()
            for _ in range(args.concurrency):
                pools[rt].put_nowait(Connection("127.0.0.1", port))
            await kernelbox_run(pools[rt], STACK_CODE)(0)  # starts the templates
            await drive(
                args.concurrency * 2, args.concurrency, kernelbox_run(pools[rt], STACK_CODE)
            )
        for _ in range(args.run_code_rounds):
            for rt, s in series.items():
                n = args.requests // args.run_code_rounds
                cpu = await asyncio.to_thread(templates_cpu, s.backend, s.server_pid)
                wall, latencies, errors = await drive(
                    n, args.concurrency, kernelbox_run(pools[rt], STACK_CODE)
                )
                cpu = await asyncio.to_thread(templates_cpu, s.backend, s.server_pid) - cpu
                s.run_code_cpu += cpu
                s.run_code_wall += wall
                s.run_code += latencies
                s.run_code_errors += errors
    finally:
        for client in clients.values():
            await client.aclose()
        for pool in pools.values():
            while not pool.empty():
                pool.get_nowait().close()


def report(series: dict[str, Series], args: argparse.Namespace) -> None:
    names = ", ".join(f"{rt} {list(s.backend.runtime.args)}" for rt, s in series.items())
    print(f"### Docker isolation: {names} ({os.cpu_count()} cores, series alternating)\n")
    print(row("runtime", "measure", "p50 ms", "p99 ms", "n"))
    print(row("---", "---", "---", "---", "---"))
    for rt, s in series.items():
        for label, samples, fmt in (
            ("cold kernel start (engine, to ready)", s.cold, ".0f"),
            ("warm acquire (create + first `x = 1`, HTTP)", s.warm, ".1f"),
            ("`x = 1` via engine (KernelSession.execute)", s.engine, ".2f"),
            ("`x = 1` raw jupyter_client round trip", s.raw, ".2f"),
            (f"`/run_code` latency at concurrency {args.concurrency}", s.run_code, ".0f"),
        ):
            st = stats_ms(samples)
            print(row(rt, label, format(st["p50"], fmt), format(st["p99"], fmt), len(samples)))
    print()

    def mib(n: int | None) -> str:
        return f"{n / 2**20:.0f} MiB" if n else "n/a"

    for rt, s in series.items():
        cpu_ms = 1000 * s.run_code_cpu / max(len(s.run_code), 1)
        print(
            f"- {rt}: `/run_code` {s.run_code_rate:.1f} req/s ({len(s.run_code)} data-stack "
            f"runs, {s.run_code_errors} errors), {cpu_ms:.1f} ms of CPU per run in the "
            f"templates' containers; idle kernel: PSS {mib(s.pss)}, memory cgroup "
            f"{mib(s.cgroup)}"
        )
    if len(series) == 2:
        (a, sa), (b, sb) = series.items()

        def ratio(x: list[float], y: list[float]) -> str:
            return f"{stats_ms(y)['p50'] / stats_ms(x)['p50']:.2f}x"

        print(
            f"- {b} / {a} (p50): cold start {ratio(sa.cold, sb.cold)}, warm acquire "
            f"{ratio(sa.warm, sb.warm)}, `x = 1` {ratio(sa.engine, sb.engine)} (raw "
            f"{ratio(sa.raw, sb.raw)}); `/run_code` throughput "
            f"{sb.run_code_rate / sa.run_code_rate:.2f}x"
        )
    print()


def plot(series: dict[str, Series], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("cold kernel start (ms)", lambda s: s.cold),
        ("warm acquire: create + first x = 1 (ms)", lambda s: s.warm),
        ("x = 1 via engine (ms)", lambda s: s.engine),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    names = list(series)
    for ax, (title, get) in zip(axes, panels, strict=False):
        p50 = [stats_ms(get(s))["p50"] for s in series.values()]
        p99 = [stats_ms(get(s))["p99"] for s in series.values()]
        ax.bar(names, p50, color=["#4c72b0", "#dd8452"][: len(names)], label="p50")
        ax.scatter(names, p99, color="black", marker="_", s=400, label="p99", zorder=3)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    rates = [s.run_code_rate for s in series.values()]
    axes[3].bar(names, rates, color=["#4c72b0", "#dd8452"][: len(names)])
    axes[3].set_title("/run_code, data-stack code (req/s)", fontsize=10)
    fig.suptitle("kernelbox Docker backend: runc vs runsc (gVisor)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}\n")


async def main(args: argparse.Namespace) -> None:
    image = os.environ.get("KERNELBOX_IMAGE", "kernelbox-kernel:latest")
    root = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    runtimes = args.runtimes.split(",")
    series = {rt: Series(rt, DockerBackend(image=image, runtime=rt)) for rt in runtimes}
    servers = []
    try:
        await engine_phase(series, root, args)
        for i, (rt, s) in enumerate(series.items()):
            port = args.port + i
            s.url = f"http://127.0.0.1:{port}"
            server = start_server(
                port,
                backend="docker",
                docker_runtime=rt,
                image=image,
                min_idle=args.warm,
                data_dir=root / f"service-{rt}",
                run_code_templates=args.templates,
            )
            servers.append(server)
            s.server_pid = server.pid
        await service_phase(series, args)
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=120)
        for s in series.values():
            await s.backend.close()
        shutil.rmtree(root, ignore_errors=True)
    report(series, args)
    if args.plot:
        plot(series, Path(args.plot))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runtimes", default="runc,runsc")
    parser.add_argument("--port", type=int, default=8752)
    parser.add_argument("--cold-starts", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--ready-rounds", type=int, default=10)
    parser.add_argument("--templates", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=960)
    parser.add_argument("--run-code-rounds", type=int, default=3)
    parser.add_argument("--plot", default="", help="write a PNG of the figures here")
    asyncio.run(main(parser.parse_args()))
