"""Stateless runs on a fork server: a template process forks one child per run.

A fresh interpreter per run pays the interpreter start and the data-stack imports (about a
second of CPU) every time; a warm kernel pool only hides that start-up for bursts. Here a
template process (sandbox/forkserver_boot.py), started with the kernels' interpreter inside
the backend's sandbox, imports numpy, pandas and matplotlib once and then forks a child per
run, which costs milliseconds. Nothing of one run is visible to the next: each child is a
fresh copy of the template, gets its own empty working directory, its limits and its stdin,
runs the code as `__main__`, and is killed (with whatever it started) at the deadline or when
it ends; its directory is removed.

This module is the pool of templates on one backend; backends/forkserver_wire.py speaks to one
template (see forkserver_boot.py for the protocol); each backend starts its own templates
(`KernelBackend.launch_template`).

Backends:
  - local: the template runs in a bwrap sandbox like a kernel's (see backends/bwrap.py), and
    every run in user, mount, PID, IPC and network namespaces of its own (forkserver_boot
    --isolate), so runs cannot see, signal or reach each other or the template. Without the
    sandbox: a child process of the service, its runs the service's user (no boundary).
  - docker: the template runs in a kernel-image container with the kernel containers'
    hardening (no network, read-only root, no-new-privileges, limits), as root with only
    SETUID and SETGID; every run drops to its own uid and gid from a range before any code
    runs, so concurrent runs cannot read, signal or trace each other.
A template handle is a `KernelProcess` registered with its backend, so `backend.close()`
removes templates as it removes kernels, and the Docker backend's orphan reaping finds them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .backends.base import KernelBackend, TemplateOptions
from .backends.forkserver_wire import ForkServerError, RunRequest, RunResult, Template

__all__ = ["ForkServer", "ForkServerError", "ForkServerOptions", "RunRequest", "RunResult"]

log = logging.getLogger(__name__)

DEFAULT_PRELOAD = TemplateOptions().preload


@dataclass(frozen=True)
class ForkServerOptions:
    #: template processes; each forks serially, so one per core uses them all
    templates: int = 2
    #: concurrent runs per template (Docker: the size of its uid range)
    slots: int = 64
    preload: tuple[str, ...] = DEFAULT_PRELOAD
    #: children each template forks ahead of demand, so a run does not wait for its fork
    prefork: int = 8
    #: bytes kept per stream (SandboxFusion keeps 1 MiB); the rest is counted and dropped
    output_cap_bytes: int = 1024**2
    #: bytes of fetched files returned per run at most; larger files are left out
    fetch_cap_bytes: int = 64 * 1024**2
    start_timeout: float = 120.0
    #: the template's memory on transparent huge pages (glibc's heap grows on them; the rest,
    #: pymalloc's arenas included, is collapsed into them once the data stack is imported):
    #: fewer page-table entries for each fork to copy and each exit to free. Measured here:
    #: about a tenth less CPU per fork, run and exit (bench/fork_cost.py)
    hugepages: bool = True
    #: after the template reports a run's end, how long its pipes may take to reach EOF
    drain_grace: float = 2.0

    @property
    def total_slots(self) -> int:
        return self.templates * self.slots

    @property
    def template(self) -> TemplateOptions:
        """What the backend starts each template with."""
        return TemplateOptions(
            slots=self.slots,
            prefork=self.prefork,
            preload=self.preload,
            fetch_cap_bytes=self.fetch_cap_bytes,
            hugepages=self.hugepages,
        )


# -- the pool of templates ---------------------------------------------------------------------


class ForkServer:
    """Several templates on one backend, started on first use; runs go to the least busy."""

    def __init__(self, backend: KernelBackend, options: ForkServerOptions | None = None) -> None:
        self.backend = backend
        self.options = options or ForkServerOptions()
        self.templates: list[Template] = []
        self._slots = asyncio.Semaphore(self.options.templates * self.options.slots)
        self._lock = asyncio.Lock()
        self._closed = False
        self._failed_at = 0.0
        self._last_error = ""

    async def start(self) -> None:
        """Start the missing templates (also called by `run` on first use)."""
        async with self._lock:
            if self._closed:
                raise ForkServerError("the fork server is closed")
            for dead in [t for t in self.templates if not t.alive]:
                self.templates.remove(dead)
                await dead.discard()
            missing = self.options.templates - len(self.templates)
            if missing <= 0:
                return
            if time.monotonic() - self._failed_at < 5:
                raise ForkServerError(self._last_error)  # do not start one per request
            started = await asyncio.gather(
                *(self._start_one() for _ in range(missing)), return_exceptions=True
            )
            errors = [s for s in started if isinstance(s, BaseException)]
            self.templates += [s for s in started if isinstance(s, Template)]
            if errors:
                self._failed_at = time.monotonic()
                self._last_error = f"the fork server could not start: {errors[0]}"
                log.error("%s", self._last_error)
                if not self.templates:
                    raise ForkServerError(self._last_error)

    async def _start_one(self) -> Template:
        try:
            proc = await self.backend.launch_template(self.options.template)
        except (RuntimeError, NotImplementedError) as exc:  # the backend said why
            raise ForkServerError(str(exc)) from exc
        template = Template(proc, self.options.slots)
        try:
            await template.wait_ready(self.options.start_timeout)
        except BaseException:
            await template.discard()
            raise
        return template

    async def run(self, req: RunRequest) -> RunResult:
        """Run `req` in a fresh child; raises ForkServerError for faults of the sandbox."""
        if len(self.templates) < self.options.templates or not all(t.alive for t in self.templates):
            await self.start()
        async with self._slots:
            alive = [t for t in self.templates if t.alive and t.active < t.slots]
            if not alive:
                raise ForkServerError("no fork server is running")
            template = min(alive, key=lambda t: t.active)
            template.active += 1
            try:
                return await template.run(
                    req, self.options.output_cap_bytes, self.options.drain_grace
                )
            finally:
                template.active -= 1

    def memory_pss(self) -> list[int | None]:
        return [t.memory_pss() for t in self.templates]

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            templates, self.templates = self.templates, []
        await asyncio.gather(*(t.discard() for t in templates), return_exceptions=True)
