"""The Ray mode's engine: the `Engine` calls, routed to the kernel host of each session.

A front (an HTTP service; any number of them) or a Python program in the cluster (an RL
trainer's rollout workers) holds one `RayEngine`. It keeps no session of its own: it asks the
directory (cluster/directory.py) where a session lives and calls that host
(cluster/host.py). So a front that dies loses nothing, and every front serves every session.

A host that is gone (its node died, or its process) takes only its own sessions: they answer
`died`, with a message that says their machine was lost, and every other operation on them
raises SessionLost, until their owner deletes them. New sessions go to the live host with the
most free room (directory.py: `place`). `ensure_hosts` starts a host on every node that
offers `kernelbox_host` and has none, at start and every `HOSTS_EVERY` seconds after.

RL code in the same cluster uses it directly, without HTTP:

    async with open_ray_engine(Settings()) as kernels:
        session = await kernels.create("rollout-17")
        execution = await kernels.execute(session.id, "rollout-17", "x = 6 * 7\\nx")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kernelbox_server.sandbox.errors import (
    KernelStartError,
    PoolExhausted,
    SessionLost,
    SessionNotFound,
)
from kernelbox_server.sandbox.files import Listing
from kernelbox_server.sandbox.forkserver import RunRequest, RunResult
from kernelbox_server.sandbox.manager import NotebookRun
from kernelbox_server.sandbox.session import OnEvent
from kernelbox_wire.models import ErrorInfo, Execution, OutputRef, Session

from ..engine import EngineStatus, check_isolation, without_keys
from ..settings import Settings
from .directory import DirectoryActor, Located
from .host import HOST_RESOURCE, NAMESPACE, KernelHostActor, host_name

log = logging.getLogger("kernelbox.cluster")

DIRECTORY_NAME = "kernelbox-directory"
#: seconds between two rounds of `ensure_hosts` (new nodes get hosts; hosts report sessions)
HOSTS_EVERY = 5.0
#: sessions whose host a front remembers (the oldest forgotten first)
WHERE_MAX = 100_000
#: how long a host may take to answer a status question before it is left out
STATUS_TIMEOUT = 5.0

LOST = (
    "The machine running this session was lost (kernel host {host}): its kernel, variables "
    "and files are gone. Delete this session and create a new one."
)


class HostLost(Exception):
    """A call found its host gone (the argument: the host's name)."""


def lost_execution(host: str) -> Execution:
    return Execution(
        status="died",
        error=ErrorInfo(name="HostLost", value=LOST.format(host=host)),
        outputs=[OutputRef(type="error")],
    )


class RayEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: what a host this engine starts is given (worked out once, not every round)
        self._host_settings = without_keys(settings)
        self.directory = DirectoryActor.options(
            name=DIRECTORY_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            # On the head node, which the cluster does not outlive.
            resources={"node:__internal_head__": 0.001},
        ).remote()
        self._hosts: dict[str, Any] = {}
        #: where sessions were found: a session never moves, so only its end or its host's
        #: loss makes an entry wrong, and the next call to that host finds either out
        self._where: OrderedDict[str, Located] = OrderedDict()

    # -- hosts ---------------------------------------------------------------------------------

    async def ensure_hosts(self) -> list[str]:
        """A started host on every live node that offers `kernelbox_host`, each reported to
        the directory with its sessions; the names of those that answered."""
        nodes = await asyncio.to_thread(ray.nodes)
        wanted = [
            n["NodeID"] for n in nodes if n.get("Alive") and n["Resources"].get(HOST_RESOURCE)
        ]

        async def up(node_id: str) -> str | None:
            name = host_name(node_id)
            handle = KernelHostActor.options(
                name=name,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                resources={HOST_RESOURCE: 1},
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(self._host_settings, name, node_id)
            try:
                actor_id, node, capacity, held = await handle.start.remote()
            except (ActorDiedError, ActorUnavailableError) as exc:
                log.warning("kernel host %s is not serving: %s", name, exc)
                return None
            except RayTaskError as exc:
                log.error("kernel host %s failed to start: %s", name, exc.cause or exc)
                return None
            self._hosts[name] = handle
            await self.directory.host_up.remote(name, actor_id, node, capacity, held)
            return name

        started = await asyncio.gather(*(up(n) for n in wanted))
        return [name for name in started if name is not None]

    async def keep_hosts(self) -> None:
        """`ensure_hosts`, every HOSTS_EVERY seconds, until cancelled."""
        while True:
            await asyncio.sleep(HOSTS_EVERY)
            try:
                await self.ensure_hosts()
            except Exception:
                log.exception("a round of ensure_hosts failed")

    def host(self, name: str) -> Any:
        """The actor handle of a host (RL code may call its methods itself)."""
        handle = self._hosts.get(name)
        if handle is None:
            handle = self._hosts[name] = ray.get_actor(name, namespace=NAMESPACE)
        return handle

    async def _call(self, name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """`method` of the `Engine` on host `name`: its own errors raised as themselves;
        HostLost (and the directory told) when the host is gone. A handle to an actor that a
        newer one has replaced (same name: its node's host was started again) is dropped and
        the call made once more, to the new one."""
        for attempt in range(2):
            handle = None
            try:
                handle = self.host(name)
                return await handle.call.remote(method, *args, **kwargs)
            except RayTaskError as exc:
                raise _cause(exc) from None
            except (ActorDiedError, ValueError) as exc:  # ValueError: no actor by that name
                if await self._lost(name, handle) or attempt:
                    raise HostLost(name) from exc
            except ActorUnavailableError as exc:
                raise KernelStartError(f"kernel host {name} is unreachable now: {exc}") from exc
        raise AssertionError("unreachable")

    async def _lost(self, name: str, handle: Any | None) -> bool:
        """`handle` (None: no actor by that name) was found dead: whether host `name` is
        lost (False: a newer actor serves it)."""
        self._hosts.pop(name, None)
        actor_id = handle._actor_id.hex() if handle is not None else None
        lost = await self.directory.host_lost.remote(name, actor_id)
        if lost:
            for sid in [sid for sid, found in self._where.items() if found.host == name]:
                del self._where[sid]
        return lost

    async def _locate(self, session_id: str, owner: str) -> Located:
        found = self._where.get(session_id)
        if found is None:
            found = await self.directory.locate.remote(session_id)
            if found is not None and not found.lost:
                self._where[session_id] = found
                if len(self._where) > WHERE_MAX:
                    self._where.popitem(last=False)
        if found is None or found.owner != owner:
            raise SessionNotFound(f"no session {session_id}")
        return found

    async def _forget(self, session_id: str) -> None:
        self._where.pop(session_id, None)
        await self.directory.drop.remote(session_id)

    async def _on_host(self, session_id: str, owner: str, method: str, *args: Any) -> Any:
        """A session's operation on its host; SessionLost if that host is gone."""
        found = await self._locate(session_id, owner)
        if found.lost:
            raise SessionLost(LOST.format(host=found.host))
        try:
            return await self._call(found.host, method, session_id, owner, *args)
        except HostLost:
            raise SessionLost(LOST.format(host=found.host)) from None
        except SessionNotFound:
            await self._forget(session_id)  # expired or deleted there
            raise

    # -- sessions ------------------------------------------------------------------------------

    async def create(
        self,
        owner: str,
        *,
        idle_timeout: float | None = None,
        env: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        tried: list[str] = []
        last: Exception | None = None
        while (name := await self.directory.place.remote(tried)) is not None:
            tried.append(name)
            try:
                session: Session = await self._call(
                    name, "create", owner, idle_timeout=idle_timeout, env=env, metadata=metadata
                )
            except (HostLost, PoolExhausted, KernelStartError) as exc:
                await self.directory.unplace.remote(name)
                last = exc
                continue
            except BaseException:
                await self.directory.unplace.remote(name)
                raise
            await self.directory.put.remote(name, owner, session)
            return session
        if isinstance(last, PoolExhausted | KernelStartError):
            raise last
        raise PoolExhausted("every kernel host is full or lost", retry_after=1.0)

    async def list(self, owner: str) -> list[Session]:
        """As each live host has them now; those of lost hosts as the directory last saw them."""
        listed: list[Located] = await self.directory.owned.remote(owner)
        live = sorted({f.host for f in listed if not f.lost})

        async def on(name: str) -> list[Session] | None:
            try:
                return await self._call(name, "list", owner)
            except HostLost:
                return None

        answers = dict(zip(live, await asyncio.gather(*(on(n) for n in live)), strict=True))
        sessions = [s for answer in answers.values() for s in answer or []]
        sessions += [
            _lost_session(f.session) for f in listed if f.lost or answers.get(f.host) is None
        ]
        return sessions

    async def get(self, session_id: str, owner: str) -> Session:
        found = await self._locate(session_id, owner)
        if found.lost:
            return _lost_session(found.session)
        try:
            return await self._on_host(session_id, owner, "get")
        except SessionLost:
            return _lost_session(found.session)

    async def delete(self, session_id: str, owner: str) -> None:
        found = await self._locate(session_id, owner)
        if not found.lost:
            with contextlib.suppress(SessionLost, SessionNotFound):
                await self._on_host(session_id, owner, "delete")
        await self._forget(session_id)

    async def check_idle(self, session_id: str, owner: str) -> None:
        found = await self._locate(session_id, owner)
        if not found.lost:
            with contextlib.suppress(SessionLost):  # its execute answers `died`
                await self._on_host(session_id, owner, "check_idle")

    async def execute(
        self,
        session_id: str,
        owner: str,
        code: str,
        timeout: float | None = None,
        on_event: OnEvent | None = None,
    ) -> Execution:
        found = await self._locate(session_id, owner)
        if found.lost:
            return lost_execution(found.host)
        try:
            if on_event is None:
                return await self._on_host(session_id, owner, "execute", code, timeout)
            return await self._stream(found.host, session_id, owner, code, timeout, on_event)
        except SessionLost:
            return lost_execution(found.host)

    async def interrupt(self, session_id: str, owner: str) -> bool:
        return await self._on_host(session_id, owner, "interrupt")

    async def restart(self, session_id: str, owner: str) -> Session:
        return await self._on_host(session_id, owner, "restart")

    async def pause(self, session_id: str, owner: str) -> Session:
        return await self._on_host(session_id, owner, "pause")

    def files(self, session_id: str, owner: str) -> RemoteFiles:
        return RemoteFiles(self, session_id, owner)

    async def notebook(self, session_id: str, owner: str) -> str:
        return await self._on_host(session_id, owner, "notebook")

    # -- one-shot runs: on any live host -------------------------------------------------------

    async def _any_host(self) -> str:
        name = await self.directory.pick.remote()
        if name is None:
            raise KernelStartError("no kernel host is serving")
        return name

    async def run_once(
        self,
        owner: str,
        code: str,
        timeout: float | None = None,
        on_event: OnEvent | None = None,
    ) -> Execution:
        name = await self._any_host()
        try:
            if on_event is None:
                return await self._call(name, "run_once", owner, code, timeout)
            return await self._stream(name, None, owner, code, timeout, on_event)
        except HostLost:
            return lost_execution(name)

    async def run_program(self, owner: str, request: RunRequest) -> RunResult:
        return await self._one_shot("run_program", owner, request)

    async def run_notebook(
        self,
        owner: str,
        cells: list[str],
        *,
        total_timeout: float,
        cell_timeout: float | None,
        files: dict[str, bytes],
        fetch: Sequence[str],
    ) -> NotebookRun:
        return await self._one_shot(
            "run_notebook",
            owner,
            cells,
            total_timeout=total_timeout,
            cell_timeout=cell_timeout,
            files=files,
            fetch=list(fetch),
        )

    async def _one_shot(self, method: str, *args: Any, **kwargs: Any) -> Any:
        name = await self._any_host()
        try:
            return await self._call(name, method, *args, **kwargs)
        except HostLost:
            raise KernelStartError(f"kernel host {name} was lost during the run") from None

    # -- streams -------------------------------------------------------------------------------

    async def _stream(
        self,
        name: str,
        session_id: str | None,
        owner: str,
        code: str,
        timeout: float | None,
        on_event: OnEvent,
    ) -> Execution:
        """An execution whose events are passed to `on_event` as the host sends them."""
        handle = None
        try:
            handle = self.host(name)
            stream = handle.execute_stream.options(num_returns="streaming").remote(
                session_id, owner, code, timeout
            )
            async for ref in stream:
                kind, item = await ref
                if kind == "done":
                    return item
                result = on_event(*item)
                if asyncio.iscoroutine(result):
                    await result
        except RayTaskError as exc:
            raise _cause(exc) from None
        except (ActorDiedError, ValueError) as exc:
            raise await self._dead(name, handle) from exc
        raise KernelStartError(f"kernel host {name} ended the stream without a result")

    async def _dead(self, name: str, handle: Any | None) -> Exception:
        """What to raise for a session's call that found its host's actor dead."""
        if await self._lost(name, handle):
            return SessionLost(LOST.format(host=name))
        return KernelStartError(f"kernel host {name} was replaced: retry")

    # -- the whole -----------------------------------------------------------------------------

    async def status(self) -> EngineStatus:
        names: list[str] = await self.directory.live_hosts.remote()
        counts: dict[str, int] = await self.directory.counts.remote()

        async def one(name: str) -> EngineStatus | None:
            try:
                return await asyncio.wait_for(self._call(name, "status"), STATUS_TIMEOUT)
            except (HostLost, KernelStartError, TimeoutError):
                return None

        answers = await asyncio.gather(*(one(n) for n in names))
        serving = {n: s for n, s in zip(names, answers, strict=True) if s is not None}
        hosts: dict[str, dict[str, Any]] = {
            n: {
                "sessions": counts.get(n, 0),
                "idle_kernels": s.idle_kernels,
                "ready": s.not_ready is None,
            }
            for n, s in serving.items()
        }
        for name, count in counts.items():
            hosts.setdefault(name, {"sessions": count, "lost": True})
        ready = [s for s in serving.values() if s.not_ready is None]
        reasons = "; ".join(f"{n}: {s.not_ready}" for n, s in serving.items() if s.not_ready)
        return EngineStatus(
            not_ready=None if ready else reasons or "no kernel host is serving",
            idle_kernels=sum(s.idle_kernels for s in serving.values()),
            sessions=sum(counts.values()),
            reaped_total=sum(s.reaped_total for s in serving.values()),
            isolation=next(iter(serving.values())).isolation if serving else {},
            hosts=hosts,
        )


class RemoteFiles:
    """A session's working directory on its host (engine.Files), through the host's calls."""

    def __init__(self, engine: RayEngine, session_id: str, owner: str) -> None:
        self.engine, self.session_id, self.owner = engine, session_id, owner

    async def _host(self) -> str:
        found = await self.engine._locate(self.session_id, self.owner)
        if found.lost:
            raise SessionLost(LOST.format(host=found.host))
        return found.host

    async def _file_call(self, method: str, *args: Any) -> Any:
        name = await self._host()
        handle = None
        try:
            handle = self.engine.host(name)
            return await getattr(handle, method).remote(self.session_id, self.owner, *args)
        except RayTaskError as exc:
            raise _cause(exc) from None
        except (ActorDiedError, ValueError) as exc:
            raise await self.engine._dead(name, handle) from exc

    async def list(self) -> Listing:
        return await self._file_call("file_list")

    async def write(self, path: str, data: bytes) -> None:
        await self._file_call("file_write", path, data)

    async def delete(self, path: str) -> None:
        await self._file_call("file_delete", path)

    async def stream(self, path: str) -> tuple[int, AsyncIterator[bytes]]:
        name = await self._host()
        handle = None
        try:
            handle = self.engine.host(name)
            refs = handle.file_read.options(num_returns="streaming").remote(
                self.session_id, self.owner, path
            )
            size = await (await anext(refs))
        except RayTaskError as exc:
            raise _cause(exc) from None
        except (ActorDiedError, ValueError) as exc:
            raise await self.engine._dead(name, handle) from exc

        async def chunks() -> AsyncIterator[bytes]:
            async for ref in refs:
                yield await ref

        return size, chunks()


def _cause(exc: RayTaskError) -> BaseException:
    """The error the host raised, as itself (Ray wraps it with the remote traceback)."""
    cause = exc.cause
    return cause if isinstance(cause, BaseException) else exc


def _lost_session(session: Session) -> Session:
    return session.model_copy(update={"status": "lost", "expires_at": None})


@contextlib.asynccontextmanager
async def open_ray_engine(settings: Settings) -> AsyncIterator[RayEngine]:
    """A RayEngine on the cluster at `settings.ray_address` (or the one this process has
    joined already), with a host started on every node that offers `kernelbox_host`. Leaving
    stops nothing in the cluster: hosts and their sessions outlive every front."""
    if not ray.is_initialized():
        await asyncio.to_thread(
            ray.init, address=settings.ray_address, namespace=NAMESPACE, log_to_driver=False
        )
    engine = RayEngine(settings)
    hosts = await engine.ensure_hosts()
    log.info("Ray mode: %d kernel hosts serving: %s", len(hosts), ", ".join(hosts) or "none")
    for name in hosts:  # this front's keys against each host's backend
        status = await engine._call(name, "status")
        check_isolation(settings, status.isolation, f"kernel host {name}")
    keeper = asyncio.create_task(engine.keep_hosts())
    try:
        yield engine
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper


async def stop_hosts() -> None:
    """Stop every kernel host gracefully (sessions kept on their nodes' disks) and the
    directory: the end of a Ray mode deployment, or of a test's cluster."""
    for node in await asyncio.to_thread(ray.nodes):
        with contextlib.suppress(ValueError):
            handle = ray.get_actor(host_name(node["NodeID"]), namespace=NAMESPACE)
            with contextlib.suppress(ActorDiedError, ActorUnavailableError):
                await handle.stop.remote()
            ray.kill(handle)
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE))
