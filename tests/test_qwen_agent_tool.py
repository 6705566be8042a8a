"""kernelbox as Qwen-Agent's `code_interpreter` (kernelbox.integrations.qwen_agent), end to end:
the real qwen-agent package's agents, a scripted OpenAI-compatible model, a real service.
Variables persist across the tool calls of one conversation; images are saved into the
tool's work_dir and linked from the text, as Qwen-Agent's own tool does."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from qwen_agent.agents import Assistant, ReActChat
from qwen_agent.tools.base import TOOL_REGISTRY

from kernelbox.integrations.qwen_agent import (
    KernelboxCodeInterpreter,
    KernelboxPythonExecutor,
    TIRMathAgent,
)
from tests.scripted_llm import scripted_model
from tests.server import running_server

KEY = "qwen-agent-key"
PLOT = "plt.plot([1, 4, 9]); plt.show()\nprint(x)"


@pytest.fixture(scope="module")
def service():
    with running_server(min_idle=1, api_key=[KEY]) as srv:
        yield srv


@pytest.fixture
def kernelbox_env(service, monkeypatch, tmp_path):
    monkeypatch.setenv("KERNELBOX_URL", service.url)
    monkeypatch.setenv("KERNELBOX_API_KEY", KEY)
    monkeypatch.delenv("M6_CODE_INTERPRETER_STATIC_URL", raising=False)
    monkeypatch.setenv("M6_CODE_INTERPRETER_WORK_DIR", str(tmp_path / "ci"))
    return tmp_path / "ci"


def nous_call(code: str) -> str:
    call = json.dumps({"name": "code_interpreter", "arguments": {"code": code}})
    return f"<tool_call>\n{call}\n</tool_call>"


def react_call(code: str) -> str:
    return f"Thought: run it\nAction: code_interpreter\nAction Input: ```py\n{code}\n```\n"


def llm_config(model) -> dict:
    return {"model": "scripted", "model_server": model.url, "api_key": "none"}


def tool_outputs(responses) -> list[str]:
    return [m["content"] for m in responses if m.get("role") == "function"]


def test_the_registry_names_it_code_interpreter():
    assert TOOL_REGISTRY["code_interpreter"] is KernelboxCodeInterpreter


def test_assistant_keeps_variables_across_calls_and_gets_images(service, kernelbox_env):
    script = [nous_call("x = 6 * 7"), nous_call(PLOT), "The answer is 42."]
    with scripted_model(script) as model:
        bot = Assistant(llm=llm_config(model), function_list=["code_interpreter"])
        tool = bot.function_map["code_interpreter"]
        assert isinstance(tool, KernelboxCodeInterpreter)
        try:
            *_, responses = bot.run([{"role": "user", "content": "What is 6 * 7?"}])
            first, second = tool_outputs(responses)
            assert first == "Finished execution."
            # Qwen-Agent's own text: the plot as markdown with a local path, then stdout.
            image_path = kernelbox_env / f"{tool.session.id}-fig-001.png"
            assert second == f"![fig-001]({image_path})\n\nstdout:\n\n```\n42\n\n```"
            assert image_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
            assert responses[-1]["content"] == "The answer is 42."
            # The model saw the tool's text in its next prompt.
            last_prompt = json.dumps(model.requests[-1]["messages"])
            assert "42" in last_prompt and "fig-001" in last_prompt
            sid = tool.session.id
        finally:
            tool.close()
    # close() deleted the session.
    answer = httpx.get(
        f"{service.url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert answer.status_code == 404


def test_react_chat_uses_it_too(service, kernelbox_env):
    script = [
        react_call("y = 'kept'"),
        react_call("print(y)"),
        "Thought: done\nFinal Answer: kept",
    ]
    with scripted_model(script) as model:
        bot = ReActChat(llm=llm_config(model), function_list=["code_interpreter"])
        tool = bot.function_map["code_interpreter"]
        try:
            *_, responses = bot.run([{"role": "user", "content": "Keep a value."}])
            text = "".join(m["content"] for m in responses if isinstance(m.get("content"), str))
            assert "Observation: stdout:\n\n```\nkept\n\n```" in text
            assert "Final Answer: kept" in text
        finally:
            tool.close()


def test_an_instance_in_function_list_with_its_own_settings(service, tmp_path):
    tool = KernelboxCodeInterpreter(
        {"base_url": service.url, "api_key": KEY, "work_dir": str(tmp_path), "timeout": 1}
    )
    try:
        assert tool.call({"code": "z = 5"}) == "Finished execution."
        assert tool.call('{"code": "print(z + 1)"}') == "stdout:\n\n```\n6\n\n```"
        timed = tool.call("```py\nimport time\nwhile True: time.sleep(0.1)\n```")
        assert "Timeout: Code execution exceeded the time limit." in timed
        assert tool.call("1 / 0").startswith("error:\n\n```\n")
        assert Path(tmp_path).is_dir()
    finally:
        tool.close()


def tir_step(code: str) -> str:
    # The TIR model writes a python block and then opens the output block, where it stops.
    return f"Let me compute.\n```python\n{code}\n```\n```output\n"


def test_tir_agent_runs_its_executor_on_kernelbox(service, kernelbox_env):
    script = [tir_step("x = 6 * 7\nprint(x)"), tir_step("x + 1"), "So the answer is 43."]
    with scripted_model(script) as model:
        bot = TIRMathAgent(llm=llm_config(model), executor={"base_url": service.url})
        assert isinstance(bot.executor, KernelboxPythonExecutor)
        try:
            *_, responses = bot.run([{"role": "user", "content": "What is 6 * 7 + 1?"}])
            text = responses[-1]["content"]
            # The executor's answers, in the TIR agent's output blocks; x lived on.
            assert "```output\n42\n```\n" in text
            assert "```output\n43\n```\n" in text
            assert text.endswith("So the answer is 43.")
            # The model saw the first output in its second prompt.
            assert "```output\\n42\\n```" in json.dumps(model.requests[1]["messages"])
            sid = bot.executor.session.id
        finally:
            bot.executor.close()
    answer = httpx.get(
        f"{service.url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert answer.status_code == 404


def test_the_executor_answers_in_the_executors_own_format(service):
    tool = KernelboxPythonExecutor({"base_url": service.url, "api_key": KEY, "timeout": 1})
    try:
        assert tool.call({"code": "print('a' * 300)"}) == ["a" * 128 + "..." + "a" * 128, "Done"]
        assert tool.call({"code": "undefined_name"}) == [
            "",
            "NameError: name 'undefined_name' is not defined",
        ]
        assert tool.call({"code": "import time\ntime.sleep(30)"}) == ["", "Timeout Error"]
        assert tool.call({"code": ""}) == ["", ""]
    finally:
        tool.close()
