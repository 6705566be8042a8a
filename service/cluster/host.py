"""A kernel host: the engine of one Ray node (its pool, its sessions, its backend), as an actor.

One host runs on each node that offers the custom resource `kernelbox_host` (`ray start
--resources='{"kernelbox_host": 1}'`), pinned there (node affinity, not soft), detached from
whichever front or driver started it so that it outlives them, and named after its node so
that every front finds the same one. It is a `LocalEngine` in the actor's process, with a
data directory of its own (`<data_dir>/hosts/<name>`), so its sessions are restored if its
process is started again on the same node. Kernels are the actor's children and die with it.

Calls take and return the wire models and the engine's records, which Ray pickles; an engine
error raised here reaches the caller as itself (cluster/engine.py unwraps it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray

from kernelbox_wire.models import Session

from ..engine import LocalEngine, open_local_engine
from ..settings import Settings

log = logging.getLogger("kernelbox.cluster")

#: the resource a node offers to say it runs a kernel host
HOST_RESOURCE = "kernelbox_host"
#: Ray's namespace for kernelbox's named actors
NAMESPACE = "kernelbox"


def host_name(node_id: str) -> str:
    return f"kernelbox-host-{node_id[:16]}"


class KernelHost:
    def __init__(self, settings: Settings, name: str, node_id: str) -> None:
        self.name = name
        self.node_id = node_id
        self.settings = settings.model_copy(
            update={"data_dir": settings.data_dir / "hosts" / name, "cluster": "none"}
        )
        self._engine: LocalEngine | None = None
        self._stack = contextlib.AsyncExitStack()
        self._starting: asyncio.Lock | None = None

    async def start(self) -> tuple[str, str, int, list[tuple[str, Session]]]:
        """Start the engine (once; later calls only report): (actor id, node id, capacity,
        the (owner, session) pairs it holds), for the directory."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._engine is None:
                self._engine = await self._stack.enter_async_context(
                    open_local_engine(self.settings)
                )
                log.info("kernel host %s serving on node %s", self.name, self.node_id)
        manager = self._engine.manager
        held = [(m.owner, m.to_model()) for m in manager.sessions]
        actor_id = ray.get_runtime_context().get_actor_id()
        return actor_id, self.node_id, manager.options.max_sessions, held

    async def stop(self) -> None:
        """Close the engine gracefully (sessions kept on disk, as a service's shutdown)."""
        self._engine = None
        await self._stack.aclose()

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One `Engine` operation (engine.py), by name."""
        return await getattr(self._running(), method)(*args, **kwargs)

    async def execute_stream(
        self, session_id: str | None, owner: str, code: str, timeout: float | None
    ) -> AsyncIterator[tuple[str, Any]]:
        """("event", (kind, data)) as the code's output arrives, then ("done", Execution).
        Without a session id: a one-shot run (run_once)."""
        engine = self._running()
        events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

        def on_event(kind: str, data: dict[str, Any]) -> None:
            events.put_nowait((kind, data))

        if session_id is None:
            run = asyncio.ensure_future(engine.run_once(owner, code, timeout, on_event))
        else:
            run = asyncio.ensure_future(engine.execute(session_id, owner, code, timeout, on_event))
        try:
            while not run.done() or not events.empty():
                got = asyncio.ensure_future(events.get())
                await asyncio.wait({got, run}, return_when=asyncio.FIRST_COMPLETED)
                if got.done():
                    yield "event", got.result()
                else:
                    got.cancel()
            yield "done", run.result()
        finally:
            if not run.done():  # the caller went away: the run goes on to its own end
                run.add_done_callback(_log_failure)

    # -- files ---------------------------------------------------------------------------------

    async def file_list(self, session_id: str, owner: str) -> Any:
        return await self._running().files(session_id, owner).list()

    async def file_write(self, session_id: str, owner: str, path: str, data: bytes) -> None:
        await self._running().files(session_id, owner).write(path, data)

    async def file_delete(self, session_id: str, owner: str, path: str) -> None:
        await self._running().files(session_id, owner).delete(path)

    async def file_read(self, session_id: str, owner: str, path: str) -> AsyncIterator[Any]:
        """The file's size, then its chunks (as the workspace reads them: bounded, off the
        loop, at most the size it had when opened)."""
        size, chunks = await self._running().files(session_id, owner).stream(path)
        yield size
        async for chunk in chunks:
            yield chunk

    def _running(self) -> LocalEngine:
        if self._engine is None:
            raise RuntimeError(f"kernel host {self.name} is not started")
        return self._engine


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a run whose caller went away failed: %r", task.exception())


# Many calls at once (each session's executions, streams, files): an async actor's loop runs
# them concurrently. Its own CPU is not reserved: kernels are its children, limited by the
# backend, not by Ray. Not restarted by Ray: a host that dies is found lost, and the next
# round of `ensure_hosts` starts a new one on the same node if that node is alive.
KernelHostActor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=10_000)(KernelHost)
