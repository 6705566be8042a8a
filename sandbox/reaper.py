"""The idle reaper: sessions idle past their timeout are closed; sessions unused for
`pause_after` seconds are paused (their variables saved, their kernels stopped); where no
filesystem enforces the disk limit, idle sessions are measured every `disk_check_interval`
(quota.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from .errors import SandboxError
from .session_registry import ManagedSession, SessionRegistry

log = logging.getLogger(__name__)


class IdleReaper:
    def __init__(
        self,
        sessions: SessionRegistry,
        close: Callable[[ManagedSession], Awaitable[None]],
        *,
        interval: float,
        pause_after: float = 0.0,
        disk_check_interval: float,
        disks_enforced: bool,
    ) -> None:
        self.sessions = sessions
        self._close = close
        self.interval = interval
        self.pause_after = pause_after
        # Sessions whose pause failed, with when they were last used: not tried again until
        # they are used again (a namespace that cannot be saved stays as it is).
        self._pause_failed: dict[str, float] = {}
        self.disk_check_interval = disk_check_interval
        self.disks_enforced = disks_enforced
        self.reaped_total = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._reap_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _reap_forever(self) -> None:
        last_disk_check = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            await self.reap_expired()
            if self.pause_after:
                await self.pause_unused()
            if (
                not self.disks_enforced
                and time.monotonic() - last_disk_check >= self.disk_check_interval
            ):
                last_disk_check = time.monotonic()
                await self.check_disks()

    async def reap_expired(self) -> None:
        now = time.time()
        expired = [m for m in self.sessions if m.expires_at <= now and not m.session.busy]
        for managed in expired:
            if self.sessions.pop(managed.id) is not None:
                log.info("session %s expired after %.0f s idle", managed.id, managed.idle_timeout)
                self.reaped_total += 1
                try:
                    await self._close(managed)
                except Exception:
                    log.exception("closing expired session %s failed", managed.id)

    async def pause_unused(self) -> None:
        now = time.time()
        for managed in self.sessions:
            session = managed.session
            if session.paused or session.busy or now - managed.last_used_at < self.pause_after:
                continue
            if self._pause_failed.get(managed.id) == managed.last_used_at:
                continue
            try:
                await session.pause()
                log.info("session %s paused after %.0f s unused", managed.id, self.pause_after)
            except SandboxError as exc:  # busy again, closed, or the namespace would not save
                log.warning("session %s was not paused: %s", managed.id, exc)
                self._pause_failed[managed.id] = managed.last_used_at
        live = {m.id for m in self.sessions}
        self._pause_failed = {k: v for k, v in self._pause_failed.items() if k in live}

    async def check_disks(self) -> None:
        sessions = [m.session for m in self.sessions]
        results = await asyncio.gather(*(s.check_disk() for s in sessions), return_exceptions=True)
        for session, result in zip(sessions, results, strict=True):
            if isinstance(result, Exception):
                log.warning("measuring the disk use of session %s failed: %s", session.id, result)
