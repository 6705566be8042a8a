"""Qwen-Agent's code tools, run on a kernelbox service.

Importing this module registers `KernelboxCodeInterpreter` as Qwen-Agent's `code_interpreter`
tool (replacing its own, which starts local Docker containers), so `Assistant`, `ReActChat`
and the other agents given `function_list=['code_interpreter']` run their code on kernelbox
without another change; an instance can be passed in `function_list` too. The tool returns
the text Qwen-Agent's own returns (kernelbox's `qwen` rendering is byte-compatible with it,
docs/renderings.md), images included: each image is saved into the tool's `work_dir` and
linked from the text by that path, or under `M6_CODE_INTERPRETER_STATIC_URL` when it is set,
as Qwen-Agent does.

Qwen-Agent's TIR agent (`TIRMathAgent`) builds its own `python_executor`, which runs the
model's code unsandboxed in the agent's process pool; `TIRMathAgent` here is the same agent
with `KernelboxPythonExecutor` in its place, answering in the executor's own format.

One kernelbox session per tool instance, made at the first call, so variables persist across
the calls of a conversation; `close()` (or the end of the instance) deletes it. Settings
(`cfg`): `base_url`, `api_key` (default: `KERNELBOX_URL`, `KERNELBOX_API_KEY`), `timeout`
(seconds per execution), `idle_timeout` (of the session), `work_dir`.
"""

from __future__ import annotations

import os
from typing import Any

from qwen_agent.agents import tir_agent
from qwen_agent.agents.fncall_agent import FnCallAgent
from qwen_agent.llm.schema import DEFAULT_SYSTEM_MESSAGE
from qwen_agent.tools.base import TOOL_REGISTRY, BaseTool, BaseToolWithFileAccess
from qwen_agent.tools.code_interpreter import CodeInterpreter
from qwen_agent.tools.python_executor import PythonExecutor
from qwen_agent.utils.utils import merge_generate_cfgs

from kernelbox.client import Session
from kernelbox_wire.models import Execution, RenderOptions
from kernelbox_wire.render import render_text
from kernelbox_wire.tools import extract_code

from ._tool_session import ToolSession

__all__ = ["KernelboxCodeInterpreter", "KernelboxPythonExecutor", "TIRMathAgent", "register"]


def _tool_session(cfg: dict) -> ToolSession:
    return ToolSession(cfg.get("base_url"), cfg.get("api_key"), cfg.get("idle_timeout"))


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
        self._kernelbox = _tool_session(self.cfg)

    @property
    def session(self) -> Session:
        """This instance's session, made on first use."""
        return self._kernelbox.session

    def call(self, params: str | dict, files: list[str] | None = None, **kwargs: Any) -> str:
        super().call(params=params, files=files)  # remote files into work_dir, as Qwen's
        for path in files or []:  # ... and on into the session's working directory
            local = os.path.join(self.work_dir, os.path.basename(path))
            if os.path.isfile(local):
                self.session.upload(local, os.path.basename(path))
        code = extract_code(params)
        if not code.strip():
            return ""  # as Qwen's tool answers empty code
        execution = self._kernelbox.execute(code, kwargs.get("timeout", self.timeout))
        static = os.getenv("M6_CODE_INTERPRETER_STATIC_URL", "")
        self._kernelbox.save_images(execution, self.work_dir, static)
        return render_text(execution, RenderOptions(style="qwen"))

    def close(self) -> None:
        """Delete the session (its variables and files) and close the connection."""
        self._kernelbox.close()

    def __del__(self) -> None:
        self.close()


# Qwen-Agent's python_executor cuts its answer and its error line to this many characters.
EXECUTOR_MAX_CHARS = 256


def _cut(text: str, max_chars: int = EXECUTOR_MAX_CHARS) -> str:
    """The executor's own cut: the first and last halves, `...` between."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return text[:half] + "..." + text[-half:]


def executor_answer(execution: Execution) -> list[str]:
    """`[output, "Done"]` or `["", error line]`, as Qwen-Agent's python_executor answers.

    The output is stdout followed by the cell's value (a kernel shows the last expression;
    the executor's subprocess does not), so `x` alone on the last line answers too.
    """
    if execution.status == "timeout":
        return ["", "Timeout Error"]
    if execution.error is not None:
        return ["", _cut(f"{execution.error.name}: {execution.error.value}".strip())]
    parts = [execution.stdout]
    for result in execution.results:
        plain = result.data.get("text/plain")
        if result.type == "execute_result" and isinstance(plain, str):
            parts.append(plain)
    return [_cut("\n".join(p.strip("\n") for p in parts if p.strip()).strip()), "Done"]


class KernelboxPythonExecutor(BaseTool):
    """Qwen-Agent's `python_executor` (the TIR agent's tool) on a kernelbox session."""

    name = PythonExecutor.name
    description = "For executing python code in a sandboxed, stateful kernel."
    parameters = PythonExecutor.parameters

    def __init__(self, cfg: dict | None = None) -> None:
        super().__init__(cfg)
        self.timeout: float | None = self.cfg.get("timeout", 20)  # the executor's default
        self._kernelbox = _tool_session(self.cfg)

    @property
    def session(self) -> Session:
        return self._kernelbox.session

    def call(self, params: str | dict, **kwargs: Any) -> list[str]:
        code = extract_code(params)
        if not code.strip():
            return ["", ""]  # as the executor answers empty code
        return executor_answer(self._kernelbox.execute(code, self.timeout))

    def close(self) -> None:
        self._kernelbox.close()

    def __del__(self) -> None:
        self.close()


class TIRMathAgent(tir_agent.TIRMathAgent):
    """Qwen-Agent's TIR agent with `KernelboxPythonExecutor` for its executor (`executor`:
    the executor's settings, as `cfg` above)."""

    def __init__(
        self,
        llm: Any = None,
        system_message: str | None = DEFAULT_SYSTEM_MESSAGE,
        name: str | None = None,
        description: str | None = None,
        executor: dict | None = None,
        **kwargs: Any,
    ) -> None:
        # The parent's __init__ would start its own executor (a process pool) first.
        FnCallAgent.__init__(
            self,
            function_list=[KernelboxPythonExecutor(executor)],
            llm=llm,
            system_message=system_message,
            name=name,
            description=description,
            **kwargs,
        )
        self.extra_generate_cfg = merge_generate_cfgs(
            base_generate_cfg=self.extra_generate_cfg,
            new_generate_cfg={"stop": [tir_agent.OBS_START]},
        )

    @property
    def executor(self) -> KernelboxPythonExecutor:
        return self.function_map[PythonExecutor.name]


def register() -> None:
    """Make `code_interpreter` in Qwen-Agent's registry this tool (done on import)."""
    TOOL_REGISTRY["code_interpreter"] = KernelboxCodeInterpreter


register()
