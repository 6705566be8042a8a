"""The warm pool: kernels started ahead of demand, so a session is ready in milliseconds.

A warm kernel is past start-up and the preload imports, waiting in a working directory of its
own that becomes the session's when it is taken. Taking one starts a replacement in the
background; when none is warm, `acquire` starts one cold (bounded by the start timeout). A
backend that cannot start kernels is reported (`last_error`, `/readyz`), retried with backoff,
and never makes a caller hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from .backends.base import KernelBackend
from .errors import KernelStartError
from .kernel import Kernel
from .workdirs import Workdirs

log = logging.getLogger(__name__)


@dataclass
class WarmKernel:
    kernel: Kernel
    workdir: Path
    id: str


class KernelPool:
    def __init__(
        self,
        backend: KernelBackend,
        workdirs: Workdirs,
        *,
        min_idle: int = 2,
        max_concurrent_starts: int = 2,
        refill_delay: float = 1.0,
    ) -> None:
        self.backend = backend
        self.workdirs = workdirs
        self.min_idle = min_idle
        self._idle: list[WarmKernel] = []
        self._starting = 0
        self._start_slots = asyncio.Semaphore(max_concurrent_starts)
        # fresh() kernels of a forking backend: a fork costs a tenth of a spawn's CPU
        self._fresh_slots = asyncio.Semaphore(max(8, max_concurrent_starts))
        self._wakeup = asyncio.Event()
        self._refiller: asyncio.Task[None] | None = None
        self._closed = False
        # While warm kernels remain, replacements start a little later: a kernel booting
        # (imports, a second or two of CPU) would otherwise slow the session just handed out.
        self.refill_delay = refill_delay
        self._delayed_wakeup: asyncio.TimerHandle | None = None
        self.last_error: str | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._refiller = asyncio.get_running_loop().create_task(self._refill_forever())

    async def close(self) -> None:
        self._closed = True
        if self._delayed_wakeup is not None:
            self._delayed_wakeup.cancel()
        if self._refiller is not None:
            self._refiller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refiller
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._discard(w) for w in idle), return_exceptions=True)

    # -- state ----------------------------------------------------------------------------

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def ready(self) -> bool:
        """Can a caller get a kernel now? (`/readyz`) A warm one is waiting; or, for a pool
        that keeps none warm, the last start worked."""
        if self._closed:
            return False
        if self.min_idle > 0:
            return any(w.kernel.alive for w in self._idle)
        return self.last_error is None

    # -- taking kernels -------------------------------------------------------------------

    async def acquire(self) -> WarmKernel:
        """A warm kernel if one is waiting, else one started now (cold)."""
        while self._idle:
            warm = self._idle.pop(0)
            if warm.kernel.alive:
                self._refill_soon()
                return warm
            await self._discard(warm)
        self._wakeup.set()
        return await self._start_one()

    async def fresh(self) -> WarmKernel:
        """A kernel started now for one caller: never one of the idle ones, and not replaced
        by the pool (for a backend that forks kernels, where a start costs milliseconds)."""
        async with self._fresh_slots:
            return await self._new_kernel(throwaway=True)

    def _refill_soon(self) -> None:
        if not self._idle:
            self._wakeup.set()
        elif self._delayed_wakeup is None or self._delayed_wakeup.cancelled():
            loop = asyncio.get_running_loop()
            self._delayed_wakeup = loop.call_later(self.refill_delay, self._wake)

    def _wake(self) -> None:
        self._delayed_wakeup = None
        self._wakeup.set()

    # -- internals ------------------------------------------------------------------------

    async def _start_one(self) -> WarmKernel:
        self._starting += 1
        try:
            async with self._start_slots:
                warm = await self._new_kernel()
        except KernelStartError as exc:
            self.last_error = str(exc)
            raise
        finally:
            self._starting -= 1
        self.last_error = None
        return warm

    async def _new_kernel(self, throwaway: bool = False) -> WarmKernel:
        try:
            under = self.backend.oneshot_dir if throwaway else None
            kid, workdir = await self.workdirs.create(throwaway, under)
        except OSError as exc:
            raise KernelStartError(f"no working directory could be made: {exc}") from exc
        try:
            kernel = await Kernel.start(self.backend, workdir)
        except BaseException:
            await self.workdirs.remove(workdir)
            raise
        return WarmKernel(kernel, workdir, kid)

    async def _discard(self, warm: WarmKernel) -> None:
        try:
            await warm.kernel.shutdown()
        finally:
            await self.workdirs.remove(warm.workdir)

    async def _refill_forever(self) -> None:
        backoff = 0.5
        while not self._closed:
            # Dead warm kernels are replaced too.
            for warm in [w for w in self._idle if not w.kernel.alive]:
                self._idle.remove(warm)
                await self._discard(warm)
            missing = self.min_idle - len(self._idle) - self._starting
            if missing <= 0:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=5)
                continue
            results = await asyncio.gather(
                *(self._start_one() for _ in range(missing)), return_exceptions=True
            )
            failed = False
            for result in results:
                if isinstance(result, WarmKernel):
                    if self._closed:
                        await self._discard(result)
                    else:
                        self._idle.append(result)
                else:
                    failed = True
                    log.error("warm pool could not start a kernel: %s", result)
            if failed:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)
            else:
                backoff = 0.5
