"""One-shot kernels: a fresh kernel for one caller, discarded (kernel and files) after: a warm
one from the pool (which starts a replacement), or, where the backend forks kernels (a start
in milliseconds), one forked for it alone, so one-shot runs never drain the sessions' pool.
Each counts as one of the owner's one-shot runs and against the slots (its own and the
service's)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from kernelbox_wire.models import Execution

from .pool import KernelPool, WarmKernel
from .session import KernelSession, OnEvent
from .slots import Slots

log = logging.getLogger(__name__)


class OneShotKernels:
    def __init__(
        self, pool: KernelPool, slots: Slots, make_session: Callable[[WarmKernel], KernelSession]
    ) -> None:
        self.pool = pool
        self.slots = slots
        self._make_session = make_session

    @contextlib.asynccontextmanager
    async def throwaway(
        self, owner: str, fresh: bool | None = None
    ) -> AsyncIterator[KernelSession]:
        """`fresh`: a kernel started for this caller, not the pool's (default: where the
        backend forks kernels)."""
        if fresh is None:
            fresh = self.pool.backend.forks_kernels
        async with self.slots.run(owner):
            await self.slots.take(owner)
            try:
                warm = await (self.pool.fresh() if fresh else self.pool.acquire())
                session = self._make_session(warm)
                try:
                    yield session
                finally:
                    try:
                        await session.close()
                    finally:
                        await remove_workspace(session)
            finally:
                self.slots.give_back(owner)

    async def run_once(
        self, owner: str, code: str, timeout: float | None, on_event: OnEvent | None
    ) -> Execution:
        async with self.throwaway(owner) as session:
            return await session.execute(code, timeout, on_event)


async def remove_workspace(session: KernelSession) -> None:
    try:
        await session.workspace.remove()
    except Exception:
        # Left for the instance's removal at shutdown (or the next start's, after a crash).
        log.exception("could not remove the working directory of session %s", session.id)
