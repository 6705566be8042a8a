"""What flooding sessions make the service hold, and how fast a session recovers from abuse.

Against a real `kernelbox serve` process: each scenario runs in fresh sessions while a thread
samples the service's resident memory (RSS, the service process alone: kernels are separate
processes or containers) every 50 ms. Reported per scenario: RSS before and at its peak, the
size of the largest answer, and the time until the session answered `1 + 1` again.

    python -m bench.flood [--backend local|docker]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time

import httpx
import psutil

from bench.common import row, start_server, wait_ready

RAW = """
k = get_ipython().kernel
for i in range({n}):
    k.session.send(k.iopub_socket, 'display_data',
                   {{'data': {{'text/plain': 'x' * {size}}}, 'metadata': {{}}}},
                   parent=k.get_parent('shell'))
"""
SCENARIOS = {
    "raw displays around the kernel's caps, 100 x 10 MB": RAW.format(n=100, size=10_000_000),
    "publish_display_data, 10 x 60 MB": (
        "from IPython.display import publish_display_data\n"
        "for i in range(10): publish_display_data({'text/plain': 'x' * 60_000_000})"
    ),
    "prints, 1 GB": "for i in range(1000): print('x' * 1_000_000)",
    "one message over the size limit (40 MB)": RAW.format(n=1, size=40_000_000),
    "fork bomb": "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
}


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def scenario(
    client: httpx.AsyncClient, pid: int, code: str, sessions: int
) -> tuple[int, int, int, float, str]:
    """(RSS before, peak RSS, largest answer in bytes, seconds to `1 + 1` again, statuses)."""
    sids = [(await client.post("/v1/sessions", json={})).json()["id"] for _ in range(sessions)]
    before = psutil.Process(pid).memory_info().rss
    try:
        with RssSampler(pid) as sampler:
            answers = await asyncio.gather(
                *(
                    client.post(f"/v1/sessions/{sid}/execute", json={"code": code, "timeout": 20})
                    for sid in sids
                )
            )
            ended = time.monotonic()
            again = await client.post(
                f"/v1/sessions/{sids[0]}/execute", json={"code": "1 + 1", "timeout": 60}
            )
            recovered = time.monotonic() - ended
        assert again.json()["status"] == "ok", again.text
        statuses = ",".join(sorted({a.json()["status"] for a in answers}))
        largest = max(len(a.content) for a in answers)
        return before, sampler.peak, largest, recovered, statuses
    finally:
        for sid in sids:
            await client.delete(f"/v1/sessions/{sid}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="local", choices=["local", "docker"])
    parser.add_argument("--port", type=int, default=8761)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    server = start_server(
        args.port,
        backend=args.backend,
        min_idle=4,
        max_sessions=16,
        data_dir=tempfile.mkdtemp(prefix="kb-bench-flood-"),
    )
    try:
        await wait_ready(url, idle=4)
        mib = 1024**2
        print(f"backend {args.backend}; execution budget 16 MiB (the default)\n")
        print(row("scenario", "sessions", "RSS before", "RSS peak", "largest answer",
                  "1 + 1 again after", "statuses"))  # fmt: skip
        print(row(*["---"] * 7))
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            for name, code in SCENARIOS.items():
                for sessions in (1, 8) if name.startswith("raw") else (1,):
                    before, peak, largest, recovered, statuses = await scenario(
                        client, server.pid, code, sessions
                    )
                    print(
                        row(
                            name,
                            sessions,
                            f"{before / mib:.0f} MiB",
                            f"{peak / mib:.0f} MiB",
                            f"{largest / mib:.1f} MiB",
                            f"{recovered:.2f} s",
                            statuses,
                        ),
                        flush=True,
                    )
    finally:
        server.terminate()
        server.wait(timeout=120)


if __name__ == "__main__":
    asyncio.run(main())
