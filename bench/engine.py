"""Engine benchmark: cold kernel start; `x = 1` through the engine vs a raw jupyter_client
round trip on the same kernel, interleaved in one run so machine noise hits both alike."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from bench.common import raw_client, raw_roundtrip, row, stats_ms, timed
from sandbox.backends.local import LocalBackend
from sandbox.session import KernelSession


async def main(rounds: int, cold_starts: int) -> None:
    backend = LocalBackend()
    root = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    try:
        cold = []
        for i in range(cold_starts):
            holder: list[KernelSession] = []

            async def start(i=i, holder=holder):
                holder.append(await KernelSession.start(backend, root / f"cold-{i}"))

            cold.append(await timed(start))
            await holder[0].close()

        session = await KernelSession.start(backend, root / "exec")
        raw = raw_client(session.kernel.proc.connection_info)
        engine_t, raw_t = [], []
        for _ in range(20):  # warm both paths
            await session.execute("x = 1")
            await raw_roundtrip(raw)
        for _ in range(rounds // 10):
            for _ in range(10):
                engine_t.append(await timed(lambda: session.execute("x = 1")))
            for _ in range(10):
                raw_t.append(await timed(lambda: raw_roundtrip(raw)))
        raw.stop_channels()
        await session.close()
    finally:
        await backend.close()

    c, e, r = stats_ms(cold), stats_ms(engine_t), stats_ms(raw_t)
    print("### Engine (local backend)\n")
    print(row("measure", "p50 ms", "p99 ms", "n"))
    print(row("---", "---", "---", "---"))
    for name, st, n, fmt in (
        ("cold kernel start (to ready, preload done)", c, len(cold), ".0f"),
        ("`x = 1` via engine (KernelSession.execute)", e, len(engine_t), ".2f"),
        ("`x = 1` raw jupyter_client round trip", r, len(raw_t), ".2f"),
    ):
        print(row(name, format(st["p50"], fmt), format(st["p99"], fmt), n))
    print(f"\nengine / raw (p50): **{e['p50'] / r['p50']:.2f}x**\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--cold-starts", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.cold_starts))
