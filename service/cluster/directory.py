"""Where each session lives, kept in the cluster: one named Ray actor that every front asks.

The directory is the truth every front shares, so any front serves any session, and a front
that dies takes nothing with it. It also places new sessions (`place`): on the live host with
the most free room, counting the sessions it has been sent but has not yet reported, so two
fronts creating at once do not both pick the same nearly-full host. Hosts announce themselves
and their sessions (`host_up`) when they start and again every few seconds, so a directory
that was restarted empty is whole again within one round. A host whose Ray node is no longer
alive is lost: its sessions stay listed, as lost, until their owners delete them.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import ray

from kernelbox_wire.models import Session

#: how long the nodes' liveness read from Ray's control store is reused
NODES_TTL = 1.0


@dataclass
class HostEntry:
    #: the Ray actor serving under the host's name now (a new one replaces a dead one)
    actor_id: str
    node_id: str
    capacity: int
    #: sessions sent to this host by `place` and not yet reported by `put`
    pending: int = 0
    lost: bool = False


@dataclass
class Located:
    host: str
    owner: str
    session: Session
    lost: bool


@dataclass
class _Entry:
    host: str
    owner: str
    session: Session
    put_at: float = field(default_factory=time.monotonic)


#: a session put this recently is kept though its host's report leaves it out (the report may
#: have been taken before the session was made)
REPORT_GRACE = 30.0


@dataclass
class Directory:
    """The actor's state and its methods (wrapped by `DirectoryActor`; plain here to test)."""

    hosts: dict[str, HostEntry] = field(default_factory=dict)
    sessions: dict[str, _Entry] = field(default_factory=dict)
    _alive: set[str] = field(default_factory=set)
    _alive_at: float = float("-inf")

    # -- hosts ---------------------------------------------------------------------------------

    def host_up(
        self,
        name: str,
        actor_id: str,
        node_id: str,
        capacity: int,
        sessions: list[tuple[str, Session]],
    ) -> None:
        """A host is serving, with these (owner, session) pairs: what it reports replaces what
        was known of it (sessions it no longer has were deleted or expired there)."""
        entry = self.hosts.get(name)
        pending = entry.pending if entry is not None and not entry.lost else 0
        self.hosts[name] = HostEntry(actor_id, node_id, capacity, pending=pending)
        reported = {session.id for _, session in sessions}
        old = time.monotonic() - REPORT_GRACE
        for sid, e in list(self.sessions.items()):
            if e.host == name and sid not in reported and e.put_at < old:
                del self.sessions[sid]
        for owner, session in sessions:
            self.sessions[session.id] = _Entry(name, owner, session)

    def host_lost(self, name: str, actor_id: str | None) -> bool:
        """A caller found the actor `actor_id` (None: any) of host `name` dead: the host is
        lost, unless a newer actor serves that name already (False then: call that one)."""
        entry = self.hosts.get(name)
        if entry is None or (actor_id is not None and entry.actor_id != actor_id):
            return entry is None
        entry.lost = True
        entry.pending = 0
        return True

    def live_hosts(self) -> list[str]:
        self._check_nodes()
        return [name for name, h in self.hosts.items() if not h.lost]

    # -- placement -----------------------------------------------------------------------------

    def place(self, exclude: list[str]) -> str | None:
        """The live host with the most free room for a new session (None: none has room);
        counted as sent there until `put` or `unplace`."""
        self._check_nodes()
        counts = self._counts()
        best: list[str] = []
        best_room = 0
        for name, host in self.hosts.items():
            if host.lost or name in exclude:
                continue
            room = host.capacity - counts.get(name, 0) - host.pending
            if room > best_room:
                best, best_room = [name], room
            elif room == best_room and room > 0:
                best.append(name)
        if not best:
            return None
        chosen = random.choice(best)
        self.hosts[chosen].pending += 1
        return chosen

    def pick(self) -> str | None:
        """A live host for a one-shot run (it holds no session): the least loaded."""
        self._check_nodes()
        counts = self._counts()
        live = [n for n, h in self.hosts.items() if not h.lost]
        if not live:
            return None
        least = min(counts.get(n, 0) + self.hosts[n].pending for n in live)
        return random.choice([n for n in live if counts.get(n, 0) + self.hosts[n].pending == least])

    def unplace(self, name: str) -> None:
        if (host := self.hosts.get(name)) is not None and host.pending > 0:
            host.pending -= 1

    def put(self, name: str, owner: str, session: Session) -> None:
        self.sessions[session.id] = _Entry(name, owner, session)
        self.unplace(name)

    # -- sessions ------------------------------------------------------------------------------

    def locate(self, session_id: str) -> Located | None:
        entry = self.sessions.get(session_id)
        if entry is None:
            return None
        self._check_nodes()
        host = self.hosts.get(entry.host)
        lost = host is None or host.lost
        return Located(entry.host, entry.owner, entry.session, lost)

    def owned(self, owner: str) -> list[Located]:
        self._check_nodes()
        return [
            Located(e.host, e.owner, e.session, self._is_lost(e.host))
            for e in self.sessions.values()
            if e.owner == owner
        ]

    def drop(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def counts(self) -> dict[str, int]:
        """Sessions per host (lost hosts' included)."""
        return self._counts()

    # -- shared --------------------------------------------------------------------------------

    def _counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.sessions.values():
            counts[entry.host] = counts.get(entry.host, 0) + 1
        return counts

    def _is_lost(self, name: str) -> bool:
        host = self.hosts.get(name)
        return host is None or host.lost

    def _check_nodes(self) -> None:
        """Mark lost every host whose node Ray no longer counts alive."""
        now = time.monotonic()
        if now - self._alive_at < NODES_TTL:
            return
        self._alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        self._alive_at = now
        for host in self.hosts.values():
            if host.node_id not in self._alive:
                host.lost = True
                host.pending = 0


# One process, calls one at a time (a plain actor): every method is a few dictionary steps.
DirectoryActor = ray.remote(num_cpus=0, max_restarts=-1)(Directory)
