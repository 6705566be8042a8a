"""Helpers shared by the benchmarks: timing, stats, a raw jupyter_client round trip."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable

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


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
