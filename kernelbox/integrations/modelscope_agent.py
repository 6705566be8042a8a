"""ModelScope-Agent's `code_interpreter`, run on a kernelbox service.

Importing this module registers `KernelboxCodeInterpreter` as ModelScope-Agent's
`code_interpreter` tool (its own starts a Jupyter kernel in the agent's own process, with the
agent's rights), so `RolePlay` and the other agents given `function_list=['code_interpreter']`
run their code on kernelbox without another change. The tool answers with the text
ModelScope-Agent's own returns (`modelscope_text`): each output on its line, images as
`![IMAGEGEN](path)` (saved into `work_dir`, or linked under `CODE_INTERPRETER_STATIC_URL`
when `image_server` is set), `The code executed successfully.` when nothing was shown.

One kernelbox session per tool instance, made at the first call, so variables persist across
the calls of a conversation; `close()` deletes it. Settings, under the tool's name in the
agent's tool config (`{'code_interpreter': {...}}`): `base_url`, `api_key` (default:
`KERNELBOX_URL`, `KERNELBOX_API_KEY`), `timeout` (seconds per execution), `idle_timeout`,
`work_dir` (default: `CODE_INTERPRETER_WORK_DIR`, else /tmp/ci_workspace, as ModelScope's).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from modelscope_agent.tools.base import TOOL_REGISTRY, BaseTool

from kernelbox.client import Session
from kernelbox_wire.models import Execution
from kernelbox_wire.render import STATE_LOST_LINE, TIMEOUT_LINE
from kernelbox_wire.text import strip_ansi, truncate_middle
from kernelbox_wire.tools import extract_code

from ._tool_session import ToolSession

__all__ = ["KernelboxCodeInterpreter", "modelscope_text", "register"]

SUCCESS_TEXT = "The code executed successfully."


def modelscope_text(execution: Execution, max_chars: int = 20_000) -> str:
    """The text ModelScope-Agent's code_interpreter answers for this execution."""
    parts: list[str] = []
    for out in execution.outputs:
        if out.type == "stream" and out.text:
            parts.append(f"\n{out.text}")
        elif out.type == "result" and out.index is not None:
            result = execution.results[out.index]
            plain = result.data.get("text/plain", "")
            html = result.data.get("text/html")
            text = plain if isinstance(plain, str) else ""
            if result.images:
                url = next(
                    (i.url for i in execution.images if i.path == result.images[0]),
                    result.images[0],
                )
                text = text if result.type == "execute_result" else ""
                image = f"\n\n![IMAGEGEN]({url})"
            else:
                if result.type == "execute_result" and isinstance(html, str):
                    text += "\n" + html
                image = ""
            parts.append((f"\n{text}" if text else "") + image)
        elif out.type == "error" and execution.error is not None:
            if execution.status == "timeout":
                parts.append(f"\n{TIMEOUT_LINE}")
            else:
                parts.append("\n" + strip_ansi("\n".join(execution.error.traceback)))
    if execution.status == "timeout" and not any(o.type == "error" for o in execution.outputs):
        parts.append(f"\n{TIMEOUT_LINE}")
    if execution.kernel_restarted:
        # The kernel had died: the model must not rely on earlier state.
        parts.append(f"\n{STATE_LOST_LINE}")
    text = "".join(parts).lstrip("\n")
    return truncate_middle(text, max_chars) if text else SUCCESS_TEXT


class KernelboxCodeInterpreter(BaseTool):
    name = "code_interpreter"
    # What the model is told is ModelScope-Agent's own, so prompts stay as they were.
    description = "代码解释器，可用于执行Python代码。"
    parameters: ClassVar[list[dict]] = [
        {"name": "code", "type": "string", "description": "待执行的代码"}
    ]

    def __init__(self, cfg: dict | None = None) -> None:
        cfg = cfg or {}
        super().__init__(cfg)
        # Agents hand a tool its own settings; BaseTool looks them up under the tool's name.
        self.cfg = cfg.get(self.name, cfg)
        self.work_dir: str = self.cfg.get(
            "work_dir", os.getenv("CODE_INTERPRETER_WORK_DIR", "/tmp/ci_workspace")
        )
        self.image_server: bool = self.cfg.get("image_server", False)
        self.timeout: float | None = self.cfg.get("timeout")
        self._kernelbox = ToolSession(
            self.cfg.get("base_url"), self.cfg.get("api_key"), self.cfg.get("idle_timeout")
        )

    @property
    def session(self) -> Session:
        """This instance's session, made on first use."""
        return self._kernelbox.session

    def call(self, params: str, timeout: float | None = None, **kwargs: Any) -> str:
        code = extract_code(params)  # JSON arguments, a dict, or fenced code
        if not code.strip():
            return ""
        execution = self._kernelbox.execute(code, timeout or self.timeout)
        static = os.getenv("CODE_INTERPRETER_STATIC_URL", "http://127.0.0.1:7866/static")
        self._kernelbox.save_images(execution, self.work_dir, static if self.image_server else "")
        return modelscope_text(execution)

    def close(self) -> None:
        """Delete the session (its variables and files) and close the connection."""
        self._kernelbox.close()

    def __del__(self) -> None:
        self.close()


def register() -> None:
    """Make `code_interpreter` in ModelScope-Agent's registry this tool (done on import)."""
    TOOL_REGISTRY["code_interpreter"] = {"class": KernelboxCodeInterpreter}


register()
