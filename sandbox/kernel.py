"""A started kernel and the jupyter_client connection to it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from jupyter_client.asynchronous import AsyncKernelClient

from .backends.base import ExitInfo, KernelBackend, KernelProcess
from .errors import KernelStartError

log = logging.getLogger(__name__)


class Kernel:
    """One kernel process plus its client. Replaced as a whole on restart."""

    def __init__(self, proc: KernelProcess) -> None:
        self.proc = proc
        self.client = AsyncKernelClient()
        self.client.load_connection_info(proc.connection_info)
        # No heartbeat channel: the backend watches the process itself, which is exact.
        self.client.start_channels(hb=False)
        self.death: asyncio.Task[ExitInfo] = asyncio.get_running_loop().create_task(proc.wait())

    @classmethod
    async def start(
        cls,
        backend: KernelBackend,
        workdir: Path,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Kernel:
        timeout = timeout or backend.config.start_timeout
        try:
            proc = await backend.start(workdir, env)
        except Exception as exc:
            raise KernelStartError(
                f"the {backend.name} backend could not start a kernel: {exc}"
            ) from exc
        kernel = cls(proc)
        try:
            await kernel._wait_ready(timeout)
        except BaseException:
            await kernel.shutdown()
            raise
        return kernel

    async def _wait_ready(self, timeout: float) -> None:
        """Ready means: the shell answers *and* IOPub is subscribed.

        PUB/SUB drops messages until the subscription reaches the kernel, so a kernel_info
        reply alone would let the first execution's output vanish. We repeat kernel_info
        until its own status message comes back on IOPub.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg_id = self.client.kernel_info()
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise KernelStartError(
                        f"the kernel did not answer within {timeout:.0f} s; "
                        f"its log ends with: {self.proc.log_tail()!r}"
                    )
                get = asyncio.ensure_future(self.client.iopub_channel.get_msg())
                done, _ = await asyncio.wait(
                    {get, self.death}, timeout=min(remaining, 0.25), return_when="FIRST_COMPLETED"
                )
                if self.death in done:
                    get.cancel()
                    info = self.death.result()
                    raise KernelStartError(
                        f"the kernel {info.reason} during start-up; "
                        f"its log ends with: {self.proc.log_tail()!r}"
                    )
                if get not in done:
                    get.cancel()
                    break  # resend kernel_info: the subscription may not have been there
                msg = get.result()
                # (kernel_info replies left on the shell channel are skipped by execute,
                # which only takes the reply to its own request.)
                if msg["parent_header"].get("msg_id") == msg_id:
                    return

    @property
    def alive(self) -> bool:
        return not self.death.done()

    async def shutdown(self) -> None:
        """Kill the process and release everything; safe to call twice."""
        try:
            await self.proc.kill()
        finally:
            self.client.stop_channels()
            await self.proc.cleanup()
            if not self.death.done():
                self.death.cancel()
            with contextlib.suppress(BaseException):
                await self.death
