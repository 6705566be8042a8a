"""`/run_code` benchmark, side by side in one run: the fork server vs a fresh interpreter per run.

- kernelbox: a real `kernelbox serve` process (local backend); `/run_code` requests over HTTP
  at concurrency 64 (a keep-alive connection per worker, from a minimal client: see
  `Connection`), at least 2000 of them, each answer checked.
- baseline: what SandboxFusion does per request, minus its HTTP layer: write the code to a
  fresh temporary directory and start `python file.py` there, stdin piped in, output read
  back; at the same concurrency, with the same interpreter, thread settings, niceness and
  kind of filesystem (tmpfs) as the fork server's runs. Its HTTP layer would only add to its
  cost, so the ratio is a floor.
Phases alternate over rounds, so that other load on the machine weighs on both alike. The
code imports the data stack (numpy, pandas, matplotlib), as model-written code does, and reads
its input from stdin; a second pair of phases runs code that imports nothing.

Reported: requests/s, p50 and p99 latency, errors, CPU per run (kernelbox: the service, the
templates and their runs; baseline: the interpreters), and PSS per idle template.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil

from bench.common import row, start_server, stats_ms, wait_ready

STACK_CODE = (
    "import numpy as np\n"
    "import pandas as pd\n"
    "import matplotlib\n"
    "n = int(input())\n"
    "print(int(np.arange(n).sum()), len(pd.DataFrame({'a': range(n)})))\n"
)
PLAIN_CODE = "n = int(input())\nprint(sum(range(n)), n)\n"
# The fork server's runs are niced (sandbox Limits.nice) so that code never starves the
# service; the baseline's interpreters get the same niceness, so that other load on the
# machine weighs on both alike.
NICE = 10


def expected(n: int) -> str:
    return f"{sum(range(n))} {n}\n"


async def drive(
    total: int, concurrency: int, one: Callable[[int], Awaitable[None]]
) -> tuple[float, list[float], int]:
    """Run `one(i)` for i < total with `concurrency` workers; wall time, latencies, errors."""
    latencies: list[float] = []
    errors = 0
    next_i = 0

    async def worker() -> None:
        nonlocal next_i, errors
        while next_i < total:
            i = next_i
            next_i += 1
            started = time.perf_counter()
            try:
                await one(i)
            except Exception as exc:
                errors += 1
                print(f"error: {exc!r}", file=sys.stderr)
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, errors


class Connection:
    """A minimal HTTP/1.1 keep-alive client connection. The client shares the 2-core machine
    with the server, so it must cost as little as possible: httpx takes about 1.4 ms of CPU
    per request here, as much as the server's HTTP layer, and would be counted against it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, body: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.writer.write(head.encode() + data)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def kernelbox_run(pool: asyncio.Queue[Connection], code: str) -> Callable[[int], Awaitable[None]]:
    async def one(i: int) -> None:
        n = i % 100 + 1
        conn = await pool.get()  # one per worker: never waits
        try:
            body = {"code": code, "language": "python", "stdin": f"{n}\n", "run_timeout": 60}
            status, raw = await conn.post_json("/run_code", body)
        finally:
            pool.put_nowait(conn)
        answer = json.loads(raw)
        if (
            status != 200
            or answer.get("status") != "Success"
            or answer["run_result"]["stdout"] != expected(n)
        ):
            raise RuntimeError(f"wrong answer: {status} {raw[:300]!r}")

    return one


def fresh_interpreter_run(code: str, root: Path, env: dict[str, str]):
    async def one(i: int) -> None:
        n = i % 100 + 1
        workdir = Path(tempfile.mkdtemp(dir=root))
        try:
            script = workdir / "main.py"
            script.write_text(code)
            proc = await asyncio.create_subprocess_exec(
                "nice",
                "-n",
                str(NICE),
                sys.executable,
                str(script),
                cwd=workdir,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
            out, err = await asyncio.wait_for(proc.communicate(f"{n}\n".encode()), 300)
            if proc.returncode != 0 or out.decode() != expected(n):
                raise RuntimeError(f"wrong answer: {out[:200]!r} {err[-300:]!r}")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    return one


def templates_of(server_pid: int) -> list[psutil.Process]:
    """The templates: fork-server processes whose parent is not one (runs are)."""
    out = []
    for proc in psutil.Process(server_pid).children(recursive=True):
        try:
            if any("forkserver_boot.py" in p for p in proc.cmdline()) and not any(
                "forkserver_boot.py" in p for p in proc.parent().cmdline()
            ):
                out.append(proc)
        except psutil.Error:
            continue
    return out


def cpu_seconds(procs: list[psutil.Process], children: bool) -> float:
    """CPU time of `procs` (and, with `children`, of the children they have reaped)."""
    total = 0.0
    for proc in procs:
        t = proc.cpu_times()
        total += t.user + t.system
        if children:
            total += t.children_user + t.children_system
    return total


async def main(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    # No warm kernels: this measures /run_code only.
    server = start_server(
        args.port, min_idle=0, data_dir=data_dir, run_code_templates=args.templates
    )
    url = f"http://127.0.0.1:{args.port}"
    clients: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(args.concurrency):
        clients.put_nowait(Connection("127.0.0.1", args.port))
    # The environment of the fork server's runs (threads of BLAS pools: one; headless plots).
    base_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": str(data_dir / "mpl"),
        **{
            v: "1"
            for v in (
                "OMP_NUM_THREADS",
                "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS",
                "NUMEXPR_NUM_THREADS",
            )
        },
    }
    totals: dict[str, dict] = {}
    root: Path | None = None
    try:
        await wait_ready(url)
        # First use starts the templates; then a warm-up burst.
        await kernelbox_run(clients, STACK_CODE)(0)
        await asyncio.sleep(2)
        templates = templates_of(server.pid)
        # A template with the children it forked ahead of demand (they share its pages).
        pss = [sum(p.memory_full_info().pss for p in [t, *t.children()]) for t in templates]
        service = [psutil.Process(server.pid)]
        await drive(args.concurrency * 2, args.concurrency, kernelbox_run(clients, STACK_CODE))
        # The baseline's matplotlib cache, built once outside the measurement.
        warm = [sys.executable, "-c", "import matplotlib.pyplot"]
        await asyncio.to_thread(subprocess.run, warm, env=base_env, check=True)
        shm = Path("/dev/shm")
        root = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else data_dir))
        phases = {
            "fork": (kernelbox_run(clients, STACK_CODE), args.requests),
            "fresh": (fresh_interpreter_run(STACK_CODE, root, base_env), args.baseline),
            "fork-plain": (kernelbox_run(clients, PLAIN_CODE), args.requests),
            "fresh-plain": (
                fresh_interpreter_run(PLAIN_CODE, root, base_env),
                args.baseline_plain,
            ),
        }

        def cpu_now() -> float:
            ours = cpu_seconds(service, False) + cpu_seconds(templates, True)
            fresh = resource.getrusage(resource.RUSAGE_CHILDREN)
            return ours + fresh.ru_utime + fresh.ru_stime

        # Rounds alternate the phases, so that other load on the machine weighs on both.
        for _ in range(args.rounds):
            for name, (one, total) in phases.items():
                n = total // args.rounds
                before = cpu_now()
                wall, lat, err = await drive(n, args.concurrency, one)
                t = totals.setdefault(name, {"wall": 0.0, "lat": [], "err": 0, "n": 0, "cpu": 0})
                t["wall"] += wall
                t["lat"] += lat
                t["err"] += err
                t["n"] += n
                t["cpu"] += cpu_now() - before
                print(f"{name}: {n / wall:.1f}/s, errors {err}", file=sys.stderr)
    finally:
        while not clients.empty():
            clients.get_nowait().close()
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(data_dir, ignore_errors=True)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def rate(name: str) -> float:
        return totals[name]["n"] / totals[name]["wall"]

    def cpu_ms(name: str) -> float:
        return 1000 * totals[name]["cpu"] / totals[name]["n"]

    def line(label: str, name: str) -> str:
        t = totals[name]
        s = stats_ms(t["lat"])
        return row(
            label,
            t["n"],
            f"{rate(name):.1f}",
            f"{s['p50']:.0f}",
            f"{s['p99']:.0f}",
            t["err"],
            f"{cpu_ms(name):.1f}",
        )

    print(
        f"### `/run_code` (local backend, {args.templates} templates, concurrency "
        f"{args.concurrency}, {os.cpu_count()} cores, {args.rounds} alternating rounds)\n"
    )
    print(row("run", "requests", "req/s", "p50 ms", "p99 ms", "errors", "CPU ms/run"))
    print(row("---", "---", "---", "---", "---", "---", "---"))
    print(line("kernelbox `/run_code`, data-stack code", "fork"))
    print(line("fresh interpreter per run, same code", "fresh"))
    print(line("kernelbox `/run_code`, code without imports", "fork-plain"))
    print(line("fresh interpreter per run, code without imports", "fresh-plain"))
    print()
    print(
        f"- data-stack code: kernelbox {rate('fork'):.1f} req/s vs fresh interpreter "
        f"{rate('fresh'):.2f} req/s = **{rate('fork') / rate('fresh'):.0f}x** (target >= 50x); "
        f"CPU per run {cpu_ms('fresh') / cpu_ms('fork'):.0f}x less"
    )
    print(
        f"- code without imports: {rate('fork-plain'):.1f} vs {rate('fresh-plain'):.1f} req/s "
        f"= {rate('fork-plain') / rate('fresh-plain'):.1f}x; CPU per run "
        f"{cpu_ms('fresh-plain') / cpu_ms('fork-plain'):.1f}x less"
    )
    mib = ", ".join(f"{p / 1024**2:.0f} MiB" for p in pss)
    print(f"- PSS per idle template (with its pre-forked children): {mib}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8732)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2100)
    parser.add_argument("--baseline", type=int, default=192)
    parser.add_argument("--baseline-plain", type=int, default=510)
    parser.add_argument("--templates", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
