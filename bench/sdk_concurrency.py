"""SDK benchmark: N concurrent `AsyncSession`s of one `AsyncClient` doing `x = 1`
(or, with `--op refresh`, a GET of the session: next to no work on the service, so what is
measured is mostly the client).

Compares the SDK as built (each session on a connection of its own) with every session's
requests going through the client's one shared httpx pool (encode/httpx#3215: that pool's
cost per request grows with its connections). Phases alternate, to share the machine's noise.
Reports aggregate executes/s and the client process's CPU time per execute.

    .venv/bin/python -m bench.sdk_concurrency [--sessions 64] [--seconds 5] [--phases 3]
                                              [--op execute|refresh]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import socket
import tempfile
import time

from bench.common import row, start_server, throughput, wait_ready
from kernelbox import AsyncClient, AsyncSession


async def phase(sessions: list[AsyncSession], seconds: float, op: str) -> tuple[float, float, int]:
    """requests/s, client CPU ms per request, errors."""

    async def execute(session: AsyncSession) -> None:
        execution = await session.execute("x = 1")
        assert execution.status == "ok", execution

    async def refresh(session: AsyncSession) -> None:
        await session.refresh()

    one = refresh if op == "refresh" else execute
    cpu = time.process_time()
    ok, errors = await throughput([functools.partial(one, s) for s in sessions], seconds)
    cpu = time.process_time() - cpu
    return ok / seconds, cpu * 1000 / max(ok, 1), errors


async def main(args: argparse.Namespace) -> None:
    server = None
    url = args.url
    if url is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        # Few warm kernels: a pool refilling 64 kernels during the phases would measure that.
        server = start_server(
            port,
            min_idle=4,
            max_sessions=args.sessions + 8,
            data_dir=tempfile.mkdtemp(prefix="kb-sdk-bench-"),
        )
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url, 4)
    try:
        async with AsyncClient(url) as client:
            sessions = [await client.create_session() for _ in range(args.sessions)]
            shared = [AsyncSession(client, s.info) for s in sessions]
            for s in shared:  # the same sessions, their requests through the one shared pool
                s._requester = client._shared
            for s in sessions:
                await s.execute("x = 1")
            await wait_ready(url, 4)  # the pool has refilled: nothing else runs during phases
            await asyncio.sleep(2)
            results: dict[str, list[tuple[float, float, int]]] = {"own": [], "shared": []}
            for _ in range(args.phases):
                results["own"].append(await phase(sessions, args.seconds, args.op))
                results["shared"].append(await phase(shared, args.seconds, args.op))
            for s in sessions:
                await s.delete()
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)

    what = "`x = 1`" if args.op == "execute" else "GET session"
    print(f"### SDK: {args.sessions} concurrent sessions of one AsyncClient, {what}\n")
    print(row("connections", "requests/s", "client CPU ms / request", "errors"))
    print(row("---", "---", "---", "---"))
    for name, label in (("own", "one per session (SDK)"), ("shared", "one shared pool")):
        rates = [r[0] for r in results[name]]
        cpu = [r[1] for r in results[name]]
        errors = sum(r[2] for r in results[name])
        print(row(label, f"{sum(rates) / len(rates):.0f}", f"{sum(cpu) / len(cpu):.2f}", errors))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running service (default: start one)")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--phases", type=int, default=3)
    parser.add_argument("--op", choices=["execute", "refresh"], default="execute")
    asyncio.run(main(parser.parse_args()))
