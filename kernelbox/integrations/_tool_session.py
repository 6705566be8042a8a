"""One kernelbox session behind one framework tool instance: what every drop-in tool shares.

The session is made at the first call, so a tool that is built but never used costs nothing,
and variables persist across the calls of a conversation; `close()` deletes it. Images an
execution shows are downloaded into the tool's work_dir, and each `Image.url` is pointed at
the local file (or under a static URL prefix), as the frameworks' own tools link them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

from kernelbox import Client
from kernelbox.client import Session
from kernelbox_wire.models import Execution

log = logging.getLogger(__name__)


class ToolSession:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self._client = Client(base_url, api_key)
        self._idle_timeout = idle_timeout
        self._session: Session | None = None
        self._lock = threading.Lock()

    @property
    def session(self) -> Session:
        """The session, made on first use."""
        with self._lock:
            if self._session is None:
                self._session = self._client.create_session(idle_timeout=self._idle_timeout)
            return self._session

    def execute(self, code: str, timeout: float | None = None) -> Execution:
        return self.session.execute(code, timeout=timeout)

    def save_images(self, execution: Execution, work_dir: str, static_url: str = "") -> None:
        """Download each image into work_dir; its url becomes the local path (or the static
        URL's, when one is given)."""
        session = self.session
        for image in execution.images:
            name = f"{session.id}-{os.path.basename(image.path)}"
            os.makedirs(work_dir, exist_ok=True)
            local = os.path.join(work_dir, name)
            session.download_to(image, local)
            image.url = f"{static_url}/{name}" if static_url else local

    def close(self) -> None:
        """Delete the session (its variables and files) and close the connection."""
        with self._lock:
            session, self._session = self._session, None
        try:
            if session is not None:
                session.delete()
        except Exception as exc:  # the service may be gone already; nothing left to free here
            log.warning("kernelbox session %s was not deleted: %s", session.id, exc)
        with contextlib.suppress(Exception):
            self._client.close()
