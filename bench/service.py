"""Service benchmark, side by side in one run against a real `kernelbox serve` process:

1. warm session ready (create + first `x = 1` over HTTP) vs a cold kernel start;
2. HTTP execute of `x = 1` vs a raw jupyter_client round trip on the same kernel;
3. 64 concurrent sessions doing trivial executes: aggregate executes/s over HTTP vs the
   raw-client ceiling on the same 64 kernels (phases alternate to share the machine's noise).

The raw client finds a session's kernel through /proc: the kernel's working directory is the
session's, and its command line names its connection file (in a local sandbox: the session's
directory is bound in its mount namespace, and the file is read through its /proc/PID/root).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

import httpx
import psutil

from bench.common import (
    raw_client,
    raw_roundtrip,
    row,
    start_server,
    stats_ms,
    throughput,
    timed,
    wait_ready,
)
from bench.engine import make_backend
from kernelbox_server.sandbox.backends.base import (
    SANDBOX_RUNTIME,
    SANDBOX_WORKDIR,
    connection_info_at,
)
from kernelbox_server.sandbox.session import KernelSession


def connection_info_of(server_pid: int, session_id: str, backend: str) -> dict:
    """The connection info of a session's kernel, found from outside the service."""
    if backend == "docker":
        import docker

        for container in docker.from_env().containers.list(filters={"label": "kernelbox.kernel"}):
            mounts = {m["Destination"]: m["Source"] for m in container.attrs["Mounts"]}
            if any(session_id in source for source in mounts.values()):
                runtime = mounts["/run/kernelbox"]
                info = json.loads(Path(runtime, "connection.json").read_text())
                return {**info, "ip": f"{runtime}/k"}  # the host side of the socket paths
    for proc in psutil.Process(server_pid).children(recursive=True):
        try:
            if session_id in proc.cwd():  # a plain local kernel
                cmd = proc.cmdline()
                return json.loads(Path(cmd[cmd.index("-f") + 1]).read_text())
            # A sandboxed one: the session's directory is bound in its mount namespace, its
            # runtime directory is reached through its /proc/PID/root.
            mounts = [line.split() for line in Path(f"/proc/{proc.pid}/mountinfo").open()]
            if any(m[4] == SANDBOX_WORKDIR and session_id in m[3] for m in mounts):
                runtime = f"/proc/{proc.pid}/root{SANDBOX_RUNTIME}"
                info = json.loads(Path(runtime, "connection.json").read_text())
                return connection_info_at(info, runtime)
        except (psutil.Error, OSError, ValueError):
            continue
    raise LookupError(f"no kernel found for session {session_id}")


async def http_execute(client: httpx.AsyncClient, sid: str) -> None:
    response = await client.post(f"/v1/sessions/{sid}/execute", json={"code": "x = 1"})
    if response.status_code != 200 or response.json()["status"] != "ok":
        raise RuntimeError(f"execute failed: {response.status_code} {response.text[:200]}")


async def main(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    port = args.port
    server = start_server(
        port,
        min_idle=args.warm,
        max_sessions=args.sessions + 8,
        data_dir=data_dir,
        backend=args.backend,
    )
    url = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(
        max_connections=args.sessions + 8, max_keepalive_connections=args.sessions + 8
    )
    client = httpx.AsyncClient(base_url=url, timeout=120, limits=limits)
    backend = make_backend(args.backend)  # for the cold starts, in this process
    try:
        await wait_ready(url, args.warm)

        # 1. warm session ready vs cold start
        warm_t, cold_t = [], []
        for i in range(args.ready_rounds):
            await wait_ready(url, 1)

            async def ready() -> None:
                sid = (await client.post("/v1/sessions", json={})).json()["id"]
                await http_execute(client, sid)
                ready.sid = sid  # type: ignore[attr-defined]

            warm_t.append(await timed(ready))
            await client.delete(f"/v1/sessions/{ready.sid}")  # type: ignore[attr-defined]
            holder: list[KernelSession] = []

            async def cold(i=i, holder=holder) -> None:
                s = await KernelSession.start(backend, data_dir / f"cold-{i}")
                await s.execute("x = 1")
                holder.append(s)

            cold_t.append(await timed(cold))
            await holder[0].close()

        # 2. HTTP execute vs raw round trip on the same kernel
        sid = (await client.post("/v1/sessions", json={})).json()["id"]
        raw = raw_client(connection_info_of(server.pid, sid, args.backend))
        for _ in range(20):
            await http_execute(client, sid)
            await raw_roundtrip(raw)
        http_t, raw_t = [], []
        for _ in range(args.rounds // 10):
            for _ in range(10):
                http_t.append(await timed(lambda: http_execute(client, sid)))
            for _ in range(10):
                raw_t.append(await timed(lambda: raw_roundtrip(raw)))
        raw.stop_channels()
        await client.delete(f"/v1/sessions/{sid}")

        # 3. concurrent sessions: HTTP aggregate vs raw ceiling on the same kernels
        ids = []
        for _ in range(args.sessions):
            response = await client.post("/v1/sessions", json={})
            response.raise_for_status()
            ids.append(response.json()["id"])
        raws = [raw_client(connection_info_of(server.pid, s, args.backend)) for s in ids]
        # One HTTP client per session: httpx's shared connection pool costs O(connections) per
        # request (encode/httpx#3215) and would measure the client instead of the service.
        ssl_ctx = httpx.create_ssl_context()
        per_session = [httpx.AsyncClient(base_url=url, timeout=120, verify=ssl_ctx) for _ in ids]
        for c in raws:
            await raw_roundtrip(c)
        http_rates, raw_rates, http_errors = [], [], 0
        for _ in range(args.phases):
            ok, err = await throughput([lambda c=c: raw_roundtrip(c) for c in raws], args.seconds)
            raw_rates.append(ok / args.seconds)
            ok, err = await throughput(
                [
                    lambda s=s, c=c: http_execute(c, s)
                    for s, c in zip(ids, per_session, strict=True)
                ],
                args.seconds,
            )
            http_rates.append(ok / args.seconds)
            http_errors += err
        for c in raws:
            c.stop_channels()
        for c in per_session:
            await c.aclose()
    finally:
        await client.aclose()
        await backend.close()
        server.terminate()
        server.wait(timeout=60)

    w, c = stats_ms(warm_t), stats_ms(cold_t)
    h, r = stats_ms(http_t), stats_ms(raw_t)
    http_rate, raw_rate = sum(http_rates) / len(http_rates), sum(raw_rates) / len(raw_rates)
    print(f"### Service ({args.backend} backend, `kernelbox serve` in its own process)\n")
    print(row("measure", "p50 ms", "p99 ms", "n"))
    print(row("---", "---", "---", "---"))
    print(
        row(
            "warm session ready (create + first `x = 1`, HTTP)",
            f"{w['p50']:.1f}",
            f"{w['p99']:.1f}",
            len(warm_t),
        )
    )
    print(
        row(
            "cold kernel start + first `x = 1` (engine)",
            f"{c['p50']:.0f}",
            f"{c['p99']:.0f}",
            len(cold_t),
        )
    )
    print(row("`x = 1` over HTTP", f"{h['p50']:.2f}", f"{h['p99']:.2f}", len(http_t)))
    print(
        row(
            "`x = 1` raw jupyter_client, same kernel",
            f"{r['p50']:.2f}",
            f"{r['p99']:.2f}",
            len(raw_t),
        )
    )
    print()
    print(
        f"- warm ready vs cold start (p50): **{c['p50'] / w['p50']:.0f}x faster** (target >= 50x)"
    )
    print(f"- HTTP execute / raw round trip (p50): **{h['p50'] / r['p50']:.2f}x** (target <= 1.5x)")
    print(
        f"- {args.sessions} concurrent sessions: HTTP {http_rate:.0f} exec/s vs raw ceiling "
        f"{raw_rate:.0f} exec/s = **{100 * http_rate / raw_rate:.0f}%** (target >= 80%), "
        f"errors: {http_errors} (phases of {args.seconds:g} s x {args.phases}, alternating)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--backend", choices=["local", "docker"], default="local")
    parser.add_argument("--warm", type=int, default=4)
    parser.add_argument("--ready-rounds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--phases", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
