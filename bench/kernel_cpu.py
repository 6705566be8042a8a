"""Where a forked kernel's CPU goes (local backend, root, bwrap): kernels started through the
engine, two cells each, then closed, `--concurrency` at a time; per kernel, the machine's CPU
(/proc/stat), the kernel process's own (read just before it is killed), the template's own
(its forks) and its children's (each kernel's PID 1: the sandbox's mounts and the kernel's
fork), and this process's (the engine's side).

    .venv/bin/python -m bench.kernel_cpu   # --kernels 60 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil

from bench.forked import CELLS
from kernelbox_server.sandbox.backends.local import LocalBackend
from kernelbox_server.sandbox.session import KernelSession, SessionOptions

TICK = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """Seconds of CPU the machine has spent busy (user, nice, system, irq, softirq)."""
    fields = [float(x) for x in open("/proc/stat").readline().split()[1:8]]
    return sum(fields[i] for i in (0, 1, 2, 5, 6)) / TICK


def times(pid: int) -> list[float]:
    """utime, stime, cutime, cstime of `pid`, in seconds."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return [int(x) / TICK for x in fields[11:15]]


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="kb-bench-cpu-"))
    os.chmod(root, 0o755)
    backend = LocalBackend(kernels="forked")
    kernel_cpu: list[float] = []

    async def one() -> None:
        workdir = Path(tempfile.mkdtemp(dir=root)) / "work"
        workdir.mkdir()
        os.chmod(workdir.parent, 0o755)
        session = await KernelSession.start(backend, workdir, options=SessionOptions())
        for cell in CELLS:
            await session.execute(cell, 30, None)
        init = session.kernel.proc.init_pid
        with open(f"/proc/{init}/task/{init}/children") as f:
            kernel = int(f.read().split()[0])
        kernel_cpu.append(sum(times(kernel)[:2]))
        await session.close()

    try:
        assert await backend.template.ready() is not None, backend.template.last_error
        handle = backend.template.handle
        assert handle is not None
        template = min(
            (
                p
                for p in psutil.Process(handle.pid).children(recursive=True)
                if "kernel_template_boot.py" in " ".join(p.cmdline())
                and os.path.basename(p.exe()).startswith("python")
            ),
            key=lambda p: (p.create_time(), p.pid),
        ).pid
        for _ in range(4):  # warm-up
            await one()
        kernel_cpu.clear()
        await asyncio.sleep(1)
        queue = list(range(args.kernels))

        async def worker() -> None:
            while queue:
                queue.pop()
                await one()

        busy, tpl, me = machine_busy(), times(template), sum(os.times()[:2])
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
        await asyncio.sleep(1)  # what the last exits cost lands in /proc/stat
        busy = machine_busy() - busy
        tpl = [b - a for a, b in zip(tpl, times(template), strict=True)]
        me = sum(os.times()[:2]) - me
    finally:
        await backend.close()
        shutil.rmtree(root)
    n = args.kernels
    ms = lambda seconds: f"{seconds / n * 1000:.1f} ms"  # noqa: E731
    print(f"{n / elapsed:.1f} kernels/s at c={args.concurrency}; per kernel:")
    print(f"  machine            {ms(busy)}")
    print(f"  kernel process     {ms(sum(kernel_cpu))} (to its last cell)")
    print(f"  template, forking  {ms(tpl[0] + tpl[1])}")
    print(f"  kernels' PID 1     {ms(tpl[2] + tpl[3])} (mounts, the kernel's fork)")
    print(f"  engine (here)      {ms(me)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernels", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=4)
    asyncio.run(main(parser.parse_args()))
