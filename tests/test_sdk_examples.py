"""The SDK's examples, run as scripts against a real service; the OpenAI one against a tiny
scripted OpenAI-compatible model server (the OpenAI SDK speaking real HTTP to it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI, Request

import kernelbox as kb
from tests.scripted_llm import scripted_model as scripted_llm
from tests.server import running_server, serving

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def server():
    with running_server(min_idle=1, max_sessions=8) as srv:
        yield srv


def run_example(name: str, server, tmp_path, *args: str, **env: str):
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "KERNELBOX_URL": server.url, **env},
        cwd=tmp_path,
        timeout=180,
    )


def test_quickstart(server, tmp_path):
    done = run_example("quickstart.py", server, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["ok 42", "43"]
    assert "-> streamed" in lines and "error ZeroDivisionError" in lines
    assert (tmp_path / "quickstart-images" / "fig-001.png").exists()
    assert "ZeroDivisionError: division by zero" in lines
    with kb.Client(server.url) as client:
        assert client.list_sessions() == []


def scripted_model() -> tuple[FastAPI, list[dict]]:
    """Answers the first chat completion with a tool call, the second with the tool's output."""
    app = FastAPI()
    seen: list[dict] = []

    def completion(message: dict, finish: str) -> dict:
        return {
            "id": f"cmpl-{len(seen)}",
            "object": "chat.completion",
            "created": 0,
            "model": "scripted",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        seen.append(body)
        tool_messages = [m for m in body["messages"] if m["role"] == "tool"]
        if not tool_messages:
            code = (
                "fib = [0, 1]\nwhile len(fib) < 31: fib.append(fib[-1] + fib[-2])\nprint(fib[30])"
            )
            call = {
                "id": "call_fib",
                "type": "function",
                "function": {"name": "code_interpreter", "arguments": json.dumps({"code": code})},
            }
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            return completion(message, "tool_calls")
        answer = f"The tool said: {tool_messages[-1]['content']}"
        return completion({"role": "assistant", "content": answer}, "stop")

    return app, seen


def test_openai_tools_example(server, tmp_path):
    app, seen = scripted_model()
    with serving(app) as model_url:
        done = run_example(
            "openai_tools.py",
            server,
            tmp_path,
            "What is the 30th Fibonacci number?",
            OPENAI_BASE_URL=f"{model_url}/v1",
            OPENAI_API_KEY="not-needed",
            MODEL="scripted",
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "The tool said: stdout:\n\n```\n832040\n\n```\n"
    assert seen[0]["tools"][0]["function"]["name"] == "code_interpreter"
    tool_message = seen[1]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == "call_fib"
    assert "832040" in tool_message["content"]


def compute_call(request: str) -> str:
    args = json.dumps({"name": "compute", "arguments": {"request": request}})
    return f"<tool_call>\n{args}\n</tool_call>"


@pytest.mark.parametrize("by", ["flags", "env"])
def test_agent_delegate_example_takes_its_endpoints_from_flags_or_env(server, tmp_path, by):
    with (
        scripted_llm([compute_call("Print 6 times 7."), "</think>\nIt is 42."]) as reasoner,
        scripted_llm(["```python\nprint(6 * 7)\n```"]) as coder,
    ):
        if by == "flags":
            args = ["--reasoner-url", reasoner.url, "--coder-url", coder.url, "--coder-model", "c"]
            env = {}
        else:
            args = []
            env = {"REASONER_BASE_URL": reasoner.url, "CODER_BASE_URL": coder.url}
        done = run_example("agent_delegate.py", server, tmp_path, *args, **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("asked: Print 6 times 7.\nwrote:\nprint(6 * 7)\n\nanswer: It is 42.\n")
    default_coder = "Qwen/Qwen2.5-Coder-7B-Instruct"
    assert coder.requests[0]["model"] == ("c" if by == "flags" else default_coder)


def test_the_agent_doc_snippet_runs_as_pasted(server, tmp_path):
    doc = (EXAMPLES.parent / "docs" / "agent.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc, re.DOTALL)
    assert snippet is not None
    script = tmp_path / "snippet.py"
    script.write_text(snippet.group(1))
    call = json.dumps({"name": "code_interpreter", "arguments": {"code": "print(6 * 7)"}})
    with scripted_llm([f"I count.\n<tool_call>\n{call}\n</tool_call>", "</think>\n42"]) as model:
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            env={**os.environ, "KERNELBOX_URL": server.url, "OPENAI_BASE_URL": model.url},
            cwd=tmp_path,
            timeout=180,
        )
    assert done.returncode == 0, done.stderr
    assert "[running code #1]\nprint(6 * 7)" in done.stdout
    assert done.stdout.endswith("\nanswer: 42\n")
    assert model.prompts[1].endswith("42\n\n```\n</tool_response>\n")
