"""What one fork-server run costs in CPU, with and without the template's memory on huge pages.

The fork server's cost per run is mostly the kernel's: the fork copying the template's
page-table entries, copy-on-write faults in the child, and the child's exit freeing its address
space. This isolates that cost (no HTTP, no pipes): a process that imported the data stack and
froze its heap, as the template does, forks a child per run that builds a small DataFrame and
exits, and waits for it. Four configurations, in fresh processes, alternating over rounds so
other load on the machine weighs on all alike:

- Python's objects in pymalloc's arenas (1 MiB mappings on 4 KiB pages) or in glibc's heap
  (PYTHONMALLOC=malloc), which grows on huge pages;
- with or without `forkserver_boot.collapse_to_huge_pages()` after the imports.

Reported: median CPU per run (the parent and its children), in ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import row

SANDBOX = Path(__file__).resolve().parent.parent / "sandbox"

CHILD = """
import gc, os, resource, sys
sys.path.insert(0, {sandbox!r})
import numpy as np, pandas as pd, matplotlib.pyplot
import forkserver_boot
gc.collect(); gc.freeze(); gc.disable()
if {collapse}:
    forkserver_boot.collapse_to_huge_pages()

def cpu():
    return sum(getattr(resource.getrusage(who), f) for who in
               (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))

def runs(n):
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            gc.enable()
            int(np.arange(10).sum()), len(pd.DataFrame({{"a": range(10)}}))
            os._exit(0)
        os.waitpid(pid, 0)

runs({runs})  # to the steady state: the template's own writes have split what they touch
before = cpu()
runs({runs})
print(1000 * (cpu() - before) / {runs})
"""

# glibc's heap grows on huge pages in all four (glibc.malloc.hugetlb=1): with pymalloc, only
# what C code allocates lives there.
CONFIGS = {
    "objects in pymalloc's arenas": ("pymalloc", False),
    "objects in pymalloc's arenas, collapsed (kernelbox)": ("pymalloc", True),
    "objects in glibc's heap": ("malloc", False),
    "objects in glibc's heap, collapsed": ("malloc", True),
}


def measure(allocator: str, collapse: bool, runs: int) -> float:
    env = dict(
        os.environ,
        PYTHONMALLOC=allocator,
        GLIBC_TUNABLES="glibc.malloc.hugetlb=1",
        MPLBACKEND="Agg",
        OPENBLAS_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
    )
    code = CHILD.format(sandbox=str(SANDBOX), collapse=collapse, runs=runs)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    )
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, (allocator, collapse) in CONFIGS.items():
            results[name].append(measure(allocator, collapse, args.runs))
    first = statistics.median(results[next(iter(CONFIGS))])
    print(f"### CPU per fork-server run ({args.rounds} rounds of {args.runs} runs, medians)\n")
    print(row("template memory", "CPU ms/run", "vs the first"))
    print(row("---", "---", "---"))
    for name, values in results.items():
        median = statistics.median(values)
        print(row(name, f"{median:.2f}", f"{median / first:.2f}x"))


if __name__ == "__main__":
    main()
