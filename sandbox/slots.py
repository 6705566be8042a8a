"""Capacity: session slots (sessions and one-shot kernels, at most `max_sessions`), each
owner's share of them, and each owner's one-shot runs at once. A share keeps one key's load
from making another key's request fail."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

from .errors import PoolExhausted


class Slots:
    def __init__(
        self,
        max_sessions: int,
        per_owner: int | None = None,
        runs_per_owner: int | None = None,
        acquire_wait: float = 0.0,
    ) -> None:
        self.max_sessions = max_sessions
        self.per_owner = per_owner
        self.runs_per_owner = runs_per_owner
        self.acquire_wait = acquire_wait
        self._free = asyncio.Semaphore(max_sessions)
        self._held: Counter[str] = Counter()  # slots per owner
        self._runs: Counter[str] = Counter()  # one-shot runs per owner

    async def take(self, owner: str) -> None:
        """One slot for `owner`, or PoolExhausted (past its share, or none free in time)."""
        limit = self.per_owner
        if limit is not None and limit < self.max_sessions and self._held[owner] >= limit:
            raise PoolExhausted(
                f"this key holds {limit} sessions and one-shot kernels, its share of the "
                f"service; delete sessions it no longer needs",
                retry_after=5,
            )
        wait = self.acquire_wait
        if wait <= 0 and self._free.locked():
            raise PoolExhausted(f"all {self.max_sessions} session slots are in use", retry_after=1)
        try:
            await asyncio.wait_for(self._free.acquire(), timeout=max(wait, 0.001))
        except TimeoutError:
            raise PoolExhausted(
                f"all {self.max_sessions} session slots stayed in use for {wait:g} s",
                retry_after=max(1, round(wait)),
            ) from None
        self._held[owner] += 1

    def give_back(self, owner: str) -> None:
        self._held[owner] -= 1
        if self._held[owner] <= 0:
            del self._held[owner]
        self._free.release()

    @contextlib.asynccontextmanager
    async def run(self, owner: str) -> AsyncIterator[None]:
        """One of the owner's one-shot runs (any kind); PoolExhausted past its share."""
        limit = self.runs_per_owner
        if limit is not None and self._runs[owner] >= limit:
            raise PoolExhausted(
                f"this key already has {limit} one-shot runs under way, its limit",
                retry_after=1,
            )
        self._runs[owner] += 1
        try:
            yield
        finally:
            self._runs[owner] -= 1
            if not self._runs[owner]:
                del self._runs[owner]
