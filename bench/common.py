"""Helpers shared by the benchmarks: timing, stats, a raw jupyter_client round trip."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import httpx
from jupyter_client.asynchronous import AsyncKernelClient


def stats_ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": statistics.median(ordered) * 1000,
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "mean": statistics.fmean(ordered) * 1000,
    }


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await fn()
    return time.perf_counter() - started


async def raw_roundtrip(client: AsyncKernelClient, code: str = "x = 1") -> None:
    """What a bare jupyter_client user does: execute, wait for the reply and for idle."""
    msg_id = client.execute(code)
    reply = idle = False
    while not (reply and idle):
        if not reply:
            msg = await client.shell_channel.get_msg(timeout=10)
            reply = msg["parent_header"].get("msg_id") == msg_id
        while not idle:
            msg = await client.iopub_channel.get_msg(timeout=10)
            if msg["parent_header"].get("msg_id") == msg_id:
                idle = msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"


def raw_client(connection_info: dict) -> AsyncKernelClient:
    client = AsyncKernelClient()
    client.load_connection_info(connection_info)
    client.start_channels(hb=False)
    return client


async def throughput(workers: list, seconds: float) -> tuple[int, int]:
    """Run each worker (an async callable) in a loop for `seconds`; count ok and errors."""
    ok = errors = 0
    stop = time.monotonic() + seconds

    async def loop(fn) -> None:
        nonlocal ok, errors
        while time.monotonic() < stop:
            try:
                await fn()
                ok += 1
            except Exception as exc:
                errors += 1
                print(f"error: {exc!r}", file=sys.stderr)

    await asyncio.gather(*(loop(fn) for fn in workers))
    return ok, errors


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def start_server(port: int, **settings: object) -> subprocess.Popen:
    """`kernelbox serve` in its own process group; settings become KERNELBOX_* variables."""
    env = {**os.environ, **{f"KERNELBOX_{k.upper()}": str(v) for k, v in settings.items()}}
    return subprocess.Popen(
        [sys.executable, "-m", "kernelbox.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


async def wait_ready(url: str, idle: int = 0, timeout: float = 600) -> None:
    """Until the service answers and its pool has `idle` warm kernels."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url) as client:
        while time.monotonic() < deadline:
            try:
                body = (await client.get("/readyz")).json()
                if body.get("idle_kernels", 0) >= idle:
                    return
            except (httpx.HTTPError, ValueError):
                pass  # not listening yet
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the service at {url} did not get {idle} warm kernels in {timeout} s")
