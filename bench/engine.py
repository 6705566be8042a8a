"""Engine benchmark, side by side in one run: cold kernel start; `x = 1` through the engine vs
a raw jupyter_client round trip on the same kernel; and, with `--backends local,docker`, the
same on both backends, interleaved round by round so machine noise hits every series alike.

    python -m bench.engine --backends local,docker
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import raw_client, raw_roundtrip, row, stats_ms, timed
from kernelbox_server.sandbox.backends.base import KernelBackend
from kernelbox_server.sandbox.session import KernelSession


def make_backend(name: str) -> KernelBackend:
    if name == "docker":
        from kernelbox_server.sandbox.backends.docker import DockerBackend

        return DockerBackend()
    from kernelbox_server.sandbox.backends.local import LocalBackend

    return LocalBackend()


@dataclass
class Series:
    backend: KernelBackend
    cold: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    pss: list[int | None] = field(default_factory=list)


async def main(backends: list[str], rounds: int, cold_starts: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    series = {name: Series(make_backend(name)) for name in backends}
    sessions: dict[str, KernelSession] = {}
    try:
        for i in range(cold_starts):  # cold starts alternate between backends too
            for name, s in series.items():
                holder: list[KernelSession] = []

                async def start(s=s, holder=holder, path=root / f"cold-{name}-{i}"):
                    holder.append(await KernelSession.start(s.backend, path))

                s.cold.append(await timed(start))
                await holder[0].close()
        raws = {}
        for name, s in series.items():
            sessions[name] = await KernelSession.start(s.backend, root / f"exec-{name}")
            raws[name] = raw_client(sessions[name].kernel.proc.connection_info)
            for _ in range(20):  # warm both paths
                await sessions[name].execute("x = 1")
                await raw_roundtrip(raws[name])
        for _ in range(rounds // 10):
            for name, s in series.items():
                session, raw = sessions[name], raws[name]
                for _ in range(10):
                    s.engine.append(await timed(lambda session=session: session.execute("x = 1")))
                for _ in range(10):
                    s.raw.append(await timed(lambda raw=raw: raw_roundtrip(raw)))
        for raw in raws.values():
            raw.stop_channels()
        # Idle memory: the benchmark's kernel and one more of the same backend, both idle; PSS
        # splits what they share (libraries, the page cache) between them.
        for name, s in series.items():
            sessions[f"{name}-2"] = await KernelSession.start(s.backend, root / f"idle-{name}")
            await asyncio.sleep(2)
            for session in (sessions[name], sessions[f"{name}-2"]):
                s.pss.append(session.kernel.proc.memory_pss())  # type: ignore[attr-defined]
    finally:
        for session in sessions.values():
            await session.close()
        for s in series.values():
            await s.backend.close()
        shutil.rmtree(root)

    print(f"### Engine ({', '.join(backends)} backend{'s' * (len(backends) > 1)})\n")
    print(row("backend", "measure", "p50 ms", "p99 ms", "n"))
    print(row("---", "---", "---", "---", "---"))
    for name, s in series.items():
        for label, samples, fmt in (
            ("cold kernel start (to ready, preload done)", s.cold, ".0f"),
            ("`x = 1` via engine (KernelSession.execute)", s.engine, ".2f"),
            ("`x = 1` raw jupyter_client round trip", s.raw, ".2f"),
        ):
            st = stats_ms(samples)
            print(row(name, label, format(st["p50"], fmt), format(st["p99"], fmt), len(samples)))
    print()
    for name, s in series.items():
        mib = ", ".join(f"{p / 2**20:.0f} MiB" for p in s.pss if p)
        print(f"- {name}: PSS of two idle kernels: {mib or 'not measurable here'}")
    for name, s in series.items():
        ratio = stats_ms(s.engine)["p50"] / stats_ms(s.raw)["p50"]
        print(f"- {name}: engine / raw round trip (p50): **{ratio:.2f}x**")
    if "local" in series and "docker" in series:
        d, loc = series["docker"], series["local"]
        execute = stats_ms(d.engine)["p50"] / stats_ms(loc.engine)["p50"]
        cold = stats_ms(d.cold)["p50"] / stats_ms(loc.cold)["p50"]
        print(f"- execute latency docker / local (p50): **{execute:.2f}x**")
        print(f"- cold start docker / local (p50): **{cold:.2f}x**")
    print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default="local", help="comma-separated: local,docker")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--cold-starts", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.backends.split(","), args.rounds, args.cold_starts))
