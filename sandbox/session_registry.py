"""Sessions by id and owner. Ownership is an opaque string (the service derives it from the
API key); a session is invisible to every other owner, which is what "another key gets 404"
rests on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kernelbox_wire.models import Session

from .errors import SessionNotFound
from .session import KernelSession


@dataclass
class ManagedSession:
    session: KernelSession
    owner: str
    idle_timeout: float
    metadata: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def expires_at(self) -> float:
        return self.last_used_at + self.idle_timeout

    @property
    def busy(self) -> bool:
        return self.session.busy

    def to_model(self) -> Session:
        return Session(
            id=self.id,
            status=self.session.status,  # type: ignore[arg-type]
            created_at=_dt(self.created_at),
            last_used_at=_dt(self.last_used_at),
            expires_at=_dt(self.expires_at),
            execution_count=self.session.execution_count,
            metadata=self.metadata,
        )


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


class SessionRegistry:
    def __init__(self) -> None:
        self._sessions: dict[str, ManagedSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[ManagedSession]:
        return iter(list(self._sessions.values()))

    def add(self, managed: ManagedSession) -> None:
        self._sessions[managed.id] = managed

    def get(self, session_id: str, owner: str) -> ManagedSession:
        managed = self._sessions.get(session_id)
        if managed is None or managed.owner != owner:
            raise SessionNotFound(f"no session {session_id!r}")
        return managed

    def find(self, session_id: str) -> ManagedSession | None:
        """The session of that id, whoever owns it (for the engine, never for a caller)."""
        return self._sessions.get(session_id)

    def of(self, owner: str) -> list[ManagedSession]:
        return [m for m in self._sessions.values() if m.owner == owner]

    def pop(self, session_id: str) -> ManagedSession | None:
        return self._sessions.pop(session_id, None)

    def drain(self) -> list[ManagedSession]:
        """Every session, now no longer registered."""
        sessions, self._sessions = list(self._sessions.values()), {}
        return sessions
