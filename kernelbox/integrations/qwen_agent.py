"""Qwen-Agent's `code_interpreter`, run on a kernelbox service.

Importing this module registers `KernelboxCodeInterpreter` as Qwen-Agent's `code_interpreter`
tool (replacing its own, which starts local Docker containers), so `Assistant`, `ReActChat`
and the TIR agents given `function_list=['code_interpreter']` run their code on kernelbox
without another change; an instance can be passed in `function_list` too. The tool returns
the text Qwen-Agent's own returns (kernelbox's `qwen` rendering is byte-compatible with it,
docs/renderings.md), images included: each image is saved into the tool's `work_dir` and
linked from the text by that path, or under `M6_CODE_INTERPRETER_STATIC_URL` when it is set,
as Qwen-Agent does.

One kernelbox session per tool instance, made at the first call, so variables persist across
the calls of a conversation; `close()` (or the end of the instance) deletes it. Settings
(`cfg`): `base_url`, `api_key` (default: `KERNELBOX_URL`, `KERNELBOX_API_KEY`), `timeout`
(seconds per execution), `idle_timeout` (of the session), `work_dir`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from qwen_agent.tools.base import TOOL_REGISTRY, BaseToolWithFileAccess
from qwen_agent.tools.code_interpreter import CodeInterpreter

from kernelbox import Client
from kernelbox.client import Session
from kernelbox_wire.models import RenderOptions
from kernelbox_wire.render import render_text
from kernelbox_wire.tools import extract_code

__all__ = ["KernelboxCodeInterpreter", "register"]


class KernelboxCodeInterpreter(BaseToolWithFileAccess):
    name = "code_interpreter"
    # What the model is told is Qwen-Agent's own, so prompts stay as they were.
    description = CodeInterpreter.description
    parameters = CodeInterpreter.parameters
    args_format = CodeInterpreter.args_format

    def __init__(self, cfg: dict | None = None) -> None:
        super().__init__(cfg)
        self.work_dir = os.getenv("M6_CODE_INTERPRETER_WORK_DIR", self.work_dir)
        self.work_dir = self.cfg.get("work_dir", self.work_dir)
        self.timeout: float | None = self.cfg.get("timeout")
        self._client = Client(self.cfg.get("base_url"), self.cfg.get("api_key"))
        self._idle_timeout: float | None = self.cfg.get("idle_timeout")
        self._session: Session | None = None
        self._lock = threading.Lock()

    @property
    def session(self) -> Session:
        """This instance's session, made on first use."""
        with self._lock:
            if self._session is None:
                self._session = self._client.create_session(idle_timeout=self._idle_timeout)
            return self._session

    def call(self, params: str | dict, files: list[str] | None = None, **kwargs: Any) -> str:
        super().call(params=params, files=files)  # remote files into work_dir, as Qwen's
        session = self.session
        for path in files or []:  # ... and on into the session's working directory
            local = os.path.join(self.work_dir, os.path.basename(path))
            if os.path.isfile(local):
                session.upload(local, os.path.basename(path))
        code = extract_code(params)
        if not code.strip():
            return ""  # as Qwen's tool answers empty code
        timeout = kwargs.get("timeout", self.timeout)
        execution = session.execute(code, timeout=timeout)
        static = os.getenv("M6_CODE_INTERPRETER_STATIC_URL", "")
        for image in execution.images:
            name = f"{session.id}-{os.path.basename(image.path)}"
            os.makedirs(self.work_dir, exist_ok=True)
            local = os.path.join(self.work_dir, name)
            session.download_to(image, local)
            image.url = f"{static}/{name}" if static else local
        return render_text(execution, RenderOptions(style="qwen"))

    def close(self) -> None:
        """Delete the session (its variables and files) and close the connection."""
        with self._lock:
            session, self._session = self._session, None
        with contextlib.suppress(Exception):
            if session is not None:
                session.delete()
        with contextlib.suppress(Exception):
            self._client.close()

    def __del__(self) -> None:
        self.close()


def register() -> None:
    """Make `code_interpreter` in Qwen-Agent's registry this tool (done on import)."""
    TOOL_REGISTRY["code_interpreter"] = KernelboxCodeInterpreter


register()
