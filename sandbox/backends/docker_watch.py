"""Deaths of a backend's containers, learnt from one Docker event stream (not one blocking
`wait` per container), on a thread of its own. A stream that breaks is reconnected, replaying
from a little before it broke, and the deaths it may have missed are looked up (`_sweep`)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from docker.errors import DockerException, NotFound

from .base import ExitInfo
from .docker_owner import LABEL_INSTANCE
from .docker_spec import exit_info

log = logging.getLogger(__name__)


class Mortal(Protocol):
    """What the watcher tells of a death (DockerKernel)."""

    def _died(self, info: ExitInfo, log_text: str) -> None: ...

    def _logs(self, max_chars: int) -> str: ...


class DeathWatcher:
    """Reports each die event of backend `instance`'s containers to the kernel `find` names."""

    def __init__(
        self,
        client: Any,
        instance: str,
        find: Callable[[str], Mortal | None],
        watched: Callable[[], Iterable[str]],
    ) -> None:
        self.client = client
        self._instance = instance
        self._find = find
        self._watched = watched
        self._closed = False
        # Replay from a little before now, so a reconnect of the stream misses nothing.
        self._events_since = int(time.time()) - 1
        self._events: Any = None
        self._thread = threading.Thread(
            target=self._watch, name="kernelbox-docker-events", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        if self._events is not None:
            with contextlib.suppress(Exception):
                self._events.close()

    def _watch(self) -> None:
        filters = {
            "type": "container",
            "event": ["die"],
            "label": [f"{LABEL_INSTANCE}={self._instance}"],
        }
        reconnect = False
        while not self._closed:
            try:
                self._events = self.client.events(
                    decode=True, since=self._events_since, filters=filters
                )
                if self._closed:
                    break
                if reconnect:
                    self._sweep()  # deaths the daemon no longer remembers (it restarted)
                for event in self._events:
                    # Replays after a reconnect start here; a repeated event is harmless.
                    self._events_since = max(self._events_since, int(event.get("time", 0)) - 1)
                    attrs = event.get("Actor", {}).get("Attributes", {})
                    self._on_die(event.get("id", ""), attrs.get("exitCode"))
            except Exception as exc:
                if self._closed:
                    break
                log.warning("Docker event stream broke (%s); reconnecting", exc)
                reconnect = True
                time.sleep(1.0)

    def _sweep(self) -> None:
        for container_id in self._watched():
            try:
                state = self.client.api.inspect_container(container_id)["State"]
            except NotFound:
                state = {"Running": False, "Status": "removed"}
            except DockerException:
                continue
            if not state.get("Running") and state.get("Status") != "created":
                self._on_die(container_id, str(state.get("ExitCode", "")))

    def _on_die(self, container_id: str, code: str | None) -> None:
        kernel = self._find(container_id)
        if kernel is None:
            return
        exit_code = int(code) if code not in (None, "") else None
        oom = False
        try:
            state = self.client.api.inspect_container(container_id)["State"]
            oom = bool(state.get("OOMKilled"))
            exit_code = state.get("ExitCode", exit_code)
        except DockerException:
            pass  # removed already (kill): the event's exit code is what we have
        kernel._died(exit_info(exit_code, oom), kernel._logs(4000))
