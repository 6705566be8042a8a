"""Pause and resume: how long each takes and how much memory a pause frees, per backend.

A session holds a few DataFrames and a fitted least-squares model; it is paused (variables
saved, kernel stopped) and resumed by its next execution, several times. Reported: pause time,
resume time (the first execution after a pause, less an ordinary execution's time; it includes a
cold kernel start, reported on its own), the
kernel's PSS before the pause (what the pause frees) and the saved state's size.

    python -m bench.pause --backends local,docker --cycles 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from kernelbox_server.sandbox.backends.base import KernelBackend
from kernelbox_server.sandbox.kernel import Kernel
from kernelbox_server.sandbox.namespace import STATE_FILE
from kernelbox_server.sandbox.session import KernelSession

STATE = """
frames = {f"df{i}": pd.DataFrame(np.random.default_rng(i).normal(size=(200_000, 5)),
                                 columns=list("abcde")) for i in range(3)}
df0, df1, df2 = frames["df0"], frames["df1"], frames["df2"]
X = np.c_[np.ones(len(df0)), df0[["a", "b", "c"]].to_numpy()]
class LinearModel:
    def fit(self, X, y):
        self.coef_, *_ = np.linalg.lstsq(X, y, rcond=None)
        return self
    def predict(self, X):
        return X @ self.coef_
model = LinearModel().fit(X, df0["d"].to_numpy())
"""
CHECK = "float(model.predict(X[:1])[0]) + len(df2)"


def make(name: str) -> KernelBackend:
    if name == "docker":
        from kernelbox_server.sandbox.backends.docker import DockerBackend

        return DockerBackend()
    from kernelbox_server.sandbox.backends.local import LocalBackend

    return LocalBackend()


async def bench(name: str, cycles: int) -> dict:
    backend = make(name)
    with tempfile.TemporaryDirectory(prefix="kb-bench-") as d:
        workdir = Path(d) / "work"
        workdir.mkdir()
        session = await KernelSession.start(backend, workdir)
        try:
            assert (await session.execute(STATE, timeout=120)).status == "ok"
            expected = (await session.execute(CHECK)).results[0].data["text/plain"]
            plain = []
            for _ in range(5):
                started = time.perf_counter()
                await session.execute("1")
                plain.append(time.perf_counter() - started)
            starts = []
            for _ in range(3):  # a cold kernel start, which a resume includes
                started = time.perf_counter()
                kernel = await Kernel.start(backend, workdir)
                starts.append(time.perf_counter() - started)
                await kernel.shutdown()
            pauses, resumes, pss, sizes = [], [], [], []
            for _ in range(cycles):
                pss.append(session.kernel.proc.memory_pss() or 0)
                started = time.perf_counter()
                report = await session.pause()
                pauses.append(time.perf_counter() - started)
                assert not report.failed, report.failed
                sizes.append((workdir / STATE_FILE).stat().st_size)
                started = time.perf_counter()
                again = await session.execute(CHECK)
                resumes.append(time.perf_counter() - started - statistics.median(plain))
                assert again.results[0].data["text/plain"] == expected
                assert again.resumed and not again.not_restored
        finally:
            await session.close()
            await backend.close()
    return {
        "backend": name,
        "cycles": cycles,
        "pause_ms_p50": round(statistics.median(pauses) * 1000, 1),
        "resume_ms_p50": round(statistics.median(resumes) * 1000, 1),
        "resume_ms_max": round(max(resumes) * 1000, 1),
        "of_which_kernel_start_ms_p50": round(statistics.median(starts) * 1000, 1),
        "kernel_pss_freed_mib": round(statistics.median(pss) / 2**20, 1),
        "state_mib": round(statistics.median(sizes) / 2**20, 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default="local,docker")
    parser.add_argument("--cycles", type=int, default=5)
    args = parser.parse_args()
    for name in args.backends.split(","):
        print(json.dumps(await bench(name.strip(), args.cycles)))


if __name__ == "__main__":
    asyncio.run(main())
