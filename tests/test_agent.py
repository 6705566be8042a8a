"""The agent loop against a scripted OpenAI-compatible model and a real kernelbox service.

For each dialect the test checks the exact prompt the model receives after a tool call: the
previous prompt, plus what the model wrote (cut at the stop string, as vLLM does), plus the
inserted text, byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kernelbox import AsyncClient
from kernelbox.agent import (
    Agent,
    AgentConfig,
    ChatML,
    CodeEvent,
    FinalEvent,
    ModelConfig,
    OutputEvent,
    TextEvent,
    get_dialect,
)
from kernelbox.agent.dialects import CODER_SYSTEM
from tests.scripted_llm import scripted_model
from tests.server import free_port, running_server, serving

QUESTION = "What is 6 * 7?"


@pytest.fixture(scope="module")
def service():
    with running_server(min_idle=2) as srv:
        yield srv


@pytest.fixture
async def session(service):
    async with AsyncClient(service.url) as client:
        async with await client.create_session() as s:
            yield s


def hermes_call(code: str) -> str:
    args = json.dumps({"name": "code_interpreter", "arguments": {"code": code}})
    return f"<tool_call>\n{args}\n</tool_call>"


async def run(model, session, **config):
    agent = Agent(ModelConfig(base_url=model.url, model="scripted"), session, AgentConfig(**config))
    try:
        return await agent.run(QUESTION)
    finally:
        await agent.model.aclose()


def stdout_block(text: str) -> str:
    return f"stdout:\n\n```\n{text}\n```"


# -- each dialect: the prompt after a tool call, byte for byte ------------------------------


async def test_hermes_inserts_tool_response_inside_think_and_keeps_variables(session):
    first = "<think>\nI will compute it.\n" + hermes_call("x = 6 * 7\nprint(x)") + "\nIGNORED"
    second = "x is 42; check once more.\n" + hermes_call("print(x + 1)")
    third = "</think>\n\nThe answer is 42."
    with scripted_model([first, second, third]) as model:
        result = await run(model, session, dialect="hermes")
    p0, p1, p2 = model.prompts
    assert p0 == ChatML().render(get_dialect("hermes").system_prompt(None), QUESTION)
    assert "<tools>\n" in p0 and '"name": "code_interpreter"' in p0
    cut1 = first.split("</tool_call>")[0]
    assert p1 == p0 + cut1 + "</tool_call>\n<tool_response>\n" + stdout_block("42\n") + (
        "\n</tool_response>\n"
    )
    cut2 = second.split("</tool_call>")[0]
    assert p2 == p1 + cut2 + "</tool_call>\n<tool_response>\n" + stdout_block("43\n") + (
        "\n</tool_response>\n"
    )
    assert [r["stop"] for r in model.requests] == [["</tool_call>"]] * 3
    assert result.answer == "The answer is 42."
    assert result.transcript == p2[len(p0) :] + third
    assert [s.code for s in result.steps] == ["x = 6 * 7\nprint(x)", "print(x + 1)"]
    assert result.tool_calls == 2


async def test_tir_inserts_an_output_block(session):
    first = "Let me compute.\n```python\nx = 6 * 7\nprint(x)\n```\n```output\nhallucinated\n```"
    second = "The answer is \\boxed{42}."
    with scripted_model([first, second]) as model:
        result = await run(model, session, dialect="tir")
    p0, p1 = model.prompts
    assert "Please integrate natural language reasoning with programs" in p0
    assert p1 == p0 + "Let me compute.\n```python\nx = 6 * 7\nprint(x)\n```\n" + (
        "```output\n42\n```\n"
    )
    assert model.requests[0]["stop"] == ["```output"]
    assert result.answer == "The answer is \\boxed{42}."


async def test_react_inserts_an_observation(session):
    first = (
        "Thought: I should run code.\nAction: code_interpreter\n"
        'Action Input: {"code": "print(6 * 7)"}\nObservation: made up'
    )
    second = "Answer: 42"
    with scripted_model([first, second]) as model:
        result = await run(model, session, dialect="react")
    p0, p1 = model.prompts
    assert "Action Input: Tool input" in p0
    cut = first.split("Observation:")[0]
    assert p1 == p0 + cut + "Observation: <result>" + stdout_block("42\n") + "</result>\n"
    assert result.answer == "42"


async def test_qwen_fn_inserts_result_and_return(session):
    first = "✿FUNCTION✿: code_interpreter\n✿ARGS✿: ```py\nprint(6 * 7)\n```\n✿RESULT✿: made up"
    second = ": The answer is 42."
    with scripted_model([first, second]) as model:
        result = await run(model, session, dialect="qwen_fn")
    p0, p1 = model.prompts
    assert "✿FUNCTION✿: The tool to use" in p0
    cut = first.split("✿RESULT✿")[0]
    assert p1 == p0 + cut + "✿RESULT✿: " + stdout_block("42\n") + "\n✿RETURN✿"
    assert model.requests[0]["stop"] == ["✿RESULT✿", "✿RETURN✿"]
    assert result.answer == "The answer is 42."


async def test_chat_dialect_uses_native_tool_messages(session):
    def call(i: int, code: str) -> dict:
        arguments = json.dumps({"code": code})
        return {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "code_interpreter", "arguments": arguments},
        }

    script = [
        {"tool_calls": [call(1, "x = 5")]},
        {"tool_calls": [call(2, "x * 2")]},
        {"content": "It is 10."},
    ]
    with scripted_model(messages=script) as model:
        result = await run(model, session, dialect="chat")
    second, third = model.requests[1]["messages"], model.requests[2]["messages"]
    assert model.requests[0]["tools"][0]["function"]["name"] == "code_interpreter"
    assert second[-1] == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "Finished execution.",
    }
    assert third[-1] == {
        "role": "tool",
        "tool_call_id": "call_2",
        "content": "execute_result:\n\n```\n10\n```",
    }
    assert third[-2]["tool_calls"][0]["id"] == "call_2"
    assert result.answer == "It is 10."


async def test_chat_continuation_mode_continues_the_final_assistant_message(session):
    first = "<think>\n" + hermes_call("print(6 * 7)")
    second = "</think>\n42"
    with scripted_model([first, second]) as model:
        result = await run(model, session, dialect="hermes", mode="chat")
    body = model.requests[1]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["messages"][-1]["role"] == "assistant"
    assert body["messages"][-1]["content"] == first.split("</tool_call>")[0] + (
        "</tool_call>\n<tool_response>\n" + stdout_block("42\n") + "\n</tool_response>\n"
    )
    assert result.answer == "42"


# -- errors, limits, malformed calls ---------------------------------------------------------


async def test_an_error_in_the_code_goes_back_to_the_model_and_the_loop_goes_on(session):
    first = hermes_call("1 / 0")
    second = "Division by zero; the answer is undefined."
    with scripted_model([first, second]) as model:
        result = await run(model, session, dialect="hermes")
    assert "error:\n\n```\nZeroDivisionError: division by zero\n\n```" in model.prompts[1]
    assert result.steps[0].execution.status == "error"
    assert result.answer == second


async def test_tool_call_limit_is_honoured(session):
    texts = [hermes_call(f"print({i})") for i in range(3)] + ["done"]
    with scripted_model(texts) as model:
        result = await run(model, session, dialect="hermes", max_tool_calls=2)
    assert result.tool_calls == 2
    assert [s.code for s in result.steps] == ["print(0)", "print(1)"]
    assert "Tool call limit reached (2)" in model.prompts[2]
    assert "stop" not in model.requests[2]  # no more stops: the model must finish


async def test_malformed_tool_calls_are_answered_with_an_observation(session):
    bad_json = '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(1)"\n'
    unknown_tool = '<tool_call>\n{"name": "web_search", "arguments": {"q": "x"}}\n'
    with scripted_model([bad_json, unknown_tool, "I give up."]) as model:
        result = await run(model, session, dialect="hermes")
    assert "InvalidToolCall: the tool call is not valid JSON" in model.prompts[1]
    assert "unknown tool 'web_search'" in model.prompts[2]
    assert [s.error is not None for s in result.steps] == [True, True]
    assert result.answer == "I give up."


async def test_code_variant_and_unclosed_tag_are_understood(session):
    code_mode = (
        '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": ""}}\n'
        "<code>\nprint('from code tags')\n</code>\n"
    )
    with scripted_model([code_mode, "ok"]) as model:
        result = await run(model, session, dialect="hermes")
    assert result.steps[0].code == "print('from code tags')"
    assert "from code tags" in model.prompts[1]
    action_form = '<tool_call>\n{"action": "code_interpreter", "action_input": "print(7)"}'
    with scripted_model([action_form, "seven"]) as model:  # model ended without </tool_call>
        result = await run(model, session, dialect="hermes")
    assert result.steps[0].code == "print(7)"
    assert model.prompts[1].endswith(
        "</tool_call>\n<tool_response>\n" + stdout_block("7\n") + "\n</tool_response>\n"
    )


# -- delegate: two models -------------------------------------------------------------------


async def test_delegate_two_models(session):
    request = json.dumps({"name": "compute", "arguments": {"request": "Print 6 times 7."}})
    ask = f"<tool_call>\n{request}\n</tool_call>"
    with (
        scripted_model([ask, "So it is 42."]) as reasoner,
        scripted_model(["```python\nprint(6 * 7)\n```"]) as coder,
    ):
        agent = Agent(
            ModelConfig(base_url=reasoner.url, model="reasoner"),
            session,
            AgentConfig(dialect="delegate"),
            coder=ModelConfig(base_url=coder.url, model="coder"),
        )
        result = await agent.run(QUESTION)
    assert '"name": "compute"' in reasoner.prompts[0]
    coder_messages = coder.requests[0]["messages"]
    assert coder_messages[-1] == {"role": "user", "content": "Print 6 times 7."}
    assert reasoner.prompts[1].endswith(
        "</tool_call>\n<tool_response>\n# code\nprint(6 * 7)\n# output\n"
        + stdout_block("42\n")
        + "\n</tool_response>\n"
    )
    assert result.steps[0].request == "Print 6 times 7." and result.steps[0].code == "print(6 * 7)"
    assert result.answer == "So it is 42."


async def test_the_coder_prompt_promises_only_what_the_kernels_have(session):
    # The local backend's kernels (the service's own interpreter) have the data stack it
    # declares; a package the prompt names must import there.
    named = [
        name
        for name in ("numpy", "pandas", "matplotlib", "scipy", "sympy", "seaborn", "sklearn")
        if name in CODER_SYSTEM
    ]
    assert named, CODER_SYSTEM
    imported = await session.execute("\n".join(f"import {name}" for name in named))
    assert imported.status == "ok", (named, imported.error)


# -- streaming events and the CLI ------------------------------------------------------------


async def test_events_stream_thinking_code_output_final(session):
    first = "<think>\nhmm\n" + hermes_call("print(6 * 7)")
    with scripted_model([first, "</think>\n42"]) as model:
        agent = Agent(ModelConfig(base_url=model.url, model="m"), session, AgentConfig())
        events = [e async for e in agent.stream(QUESTION)]
        await agent.model.aclose()
    kinds = [e.kind for e in events]
    assert kinds.index("code") < kinds.index("output") < kinds.index("final") == len(kinds) - 1
    texts = [e for e in events if isinstance(e, TextEvent)]
    assert any(e.thinking and "hmm" in e.text for e in texts)
    assert any(not e.thinking and "42" in e.text for e in texts)
    code = next(e for e in events if isinstance(e, CodeEvent))
    output = next(e for e in events if isinstance(e, OutputEvent))
    assert code.code == "print(6 * 7)" and output.execution.stdout == "42\n"
    assert isinstance(events[-1], FinalEvent) and events[-1].result.answer == "42"


async def test_text_events_split_exactly_at_think_tags_and_tool_calls(session):
    # Streamed in 7-character chunks, the tags fall across chunks: each event must still be
    # wholly thinking or not, wholly call or not, so the display never breaks mid-tag.
    thinking = "<think>\nI will compute it.\n"
    call = hermes_call("print(6 * 7)").removesuffix("</tool_call>")
    answer = "The answer is 42."
    with scripted_model([thinking + call + "</tool_call>", "</think>\n\n" + answer]) as model:
        agent = Agent(ModelConfig(base_url=model.url, model="m"), session, AgentConfig())
        events = [e async for e in agent.stream(QUESTION) if isinstance(e, TextEvent)]
        await agent.model.aclose()
    text = "".join(e.text for e in events)
    assert text == thinking + call + "</think>\n\n" + answer
    assert "".join(e.text for e in events if e.thinking) == thinking + call + "</think>"
    assert "".join(e.text for e in events if e.call) == call
    assert "".join(e.text for e in events if not e.thinking) == "\n\n" + answer


def test_the_splitter_holds_back_a_marker_cut_anywhere():
    from kernelbox.agent.loop import _TextSplitter

    text = "a <b> <think>deep</think> c\nAction: code_interpreter\nAction Input: {}"
    for size in range(1, 12):
        splitter = _TextSplitter("", ("Action:",))
        events = []
        for i in range(0, len(text), size):
            events += splitter.feed(text[i : i + size])
        events += splitter.flush()
        assert "".join(e.text for e in events) == text
        assert "".join(e.text for e in events if e.thinking) == "<think>deep</think>"
        assert "".join(e.text for e in events if e.call) == text[text.index("Action:") :]


def _cli(service, model_url: str, *extra: str, cwd=None, url=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERNELBOX_URL": url or service.url, "NO_COLOR": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kernelbox.cli",
            "agent",
            QUESTION,
            "--base-url",
            model_url,
            "--model",
            "m",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )


def test_cli_shows_the_loop_and_json_mode(service, tmp_path):
    plot = "plt.plot([1, 2]); plt.show(); print(6 * 7)"
    with scripted_model(["Let me see.\n" + hermes_call(plot), "It is 42."]) as model:
        shown = _cli(service, model.url, "--dialect", "hermes", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "Let me see." in out
    assert "code #1" in out and "plt.plot([1, 2])" in out
    assert "output #1" in out and "42" in out
    # Saved next to the user before the session ends (its URL dies with it).
    assert "image saved: kernelbox-output/fig-001.png" in out
    assert (tmp_path / "kernelbox-output" / "fig-001.png").read_bytes().startswith(b"\x89PNG")
    assert "It is 42." in out
    # The call is shown once, as code: not its raw JSON too.
    assert "<tool_call>" not in out and '"code_interpreter"' not in out
    assert out.count("plt.plot([1, 2])") == 1
    tir = "```python\n" + plot + "\n```"
    with scripted_model([tir, "\\boxed{42}"]) as model:
        as_json = _cli(service, model.url, "--dialect", "tir", "--json", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    # Saved as well, told on stderr (an earlier run's file is never overwritten).
    assert as_json.stderr == "image saved: kernelbox-output/fig-001-1.png\n"
    payload = json.loads(as_json.stdout)
    assert payload["answer"] == "\\boxed{42}"
    assert payload["steps"][0]["execution"]["stdout"] == "42\n"


def test_the_display_shows_held_call_text_that_was_no_call(capsys):
    # A ```python block the model ends its answer with is no call: shown as written. A call
    # that cannot run is shown raw with the reason; one that runs only as its CodeEvent.
    from kernelbox.agent.cli import Display
    from kernelbox.agent.events import AgentResult, ToolErrorEvent

    display = Display()
    display.show(TextEvent(text="```python\nkept_code()\n```", call=True))
    display.show(FinalEvent(result=AgentResult(question="q", answer="", transcript="")))
    display.show(TextEvent(text='<tool_call>\n{"name": "oops"}', call=True))
    display.show(ToolErrorEvent(message="unknown tool 'oops'"))
    display.show(TextEvent(text="<tool_call>\nHIDDEN", call=True))
    display.show(CodeEvent(code="shown_once()", index=1))
    display.close()
    out = capsys.readouterr().out
    assert "kept_code()" in out
    assert '{"name": "oops"}' in out and "tool call not run: unknown tool 'oops'" in out
    assert "HIDDEN" not in out and out.count("shown_once()") == 1


def test_cli_without_rich_shows_the_call_once_too(service, tmp_path):
    # rich is an optional extra: without it the display is plain text, with the same content.
    env = {**os.environ, "KERNELBOX_URL": service.url}
    no_rich = (
        "import sys; sys.modules['rich'] = None\nfrom kernelbox.cli import main; sys.exit(main())"
    )
    plot = "plt.plot([1, 2]); plt.show(); print(6 * 7)"
    with scripted_model(["<think>\nPlot.\n" + hermes_call(plot), "</think>\n**42**"]) as model:
        shown = subprocess.run(
            [sys.executable, "-c", no_rich, "agent", QUESTION, "--base-url", model.url],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "<tool_call>" not in out and out.count("plt.plot([1, 2])") == 1, out
    assert "--- code #1 ---" in out and "\x1b[" not in out  # no escapes into a pipe
    assert "image saved: kernelbox-output/fig-001.png" in out
    assert (tmp_path / "kernelbox-output" / "fig-001.png").exists()
    assert "**42**" in out  # Markdown stays as written without rich


def test_cli_renders_the_answer_as_markdown(service, tmp_path):
    answer = "<think>\nEasy.\n</think>\n\n## Result\n\nThe answer is **42**:\n\n- six\n- seven\n"
    with scripted_model([answer]) as model:
        shown = _cli(service, model.url, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "The answer is 42:" in shown.stdout  # ** gone: rendered by rich
    assert "**" not in shown.stdout and "## Result" not in shown.stdout
    assert "• six" in shown.stdout


def _failing_model_server(status: int, body: str):
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    app = FastAPI()

    @app.post("/v1/completions")
    async def completions():
        return PlainTextResponse(body, status_code=status)

    return serving(app)


def test_cli_model_and_service_failures_are_one_line_with_their_exit_code(service, tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}"

    def check(done, code: int, message: str) -> None:
        assert done.returncode == code, (message, done.stderr)
        assert done.stderr.startswith("kernelbox agent: "), done.stderr
        assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr

    no_model = _cli(service, nowhere + "/v1", cwd=tmp_path)
    check(no_model, 5, f"cannot reach the model server at {nowhere}/v1/completions")
    no_service = _cli(service, nowhere + "/v1", cwd=tmp_path, url=nowhere)
    check(no_service, 3, f"cannot connect to the kernelbox service at {nowhere}")
    with _failing_model_server(500, "boom\nTraceback (most recent call last):\n  x") as bad:
        check(_cli(service, bad + "/v1", cwd=tmp_path), 6, "answered 500: boom Traceback")
    with _failing_model_server(200, "<html>not an API</html>") as html:
        done = _cli(service, html + "/v1", cwd=tmp_path)
        check(done, 6, "answered something that is not a completion")


def test_cli_saves_what_the_agent_ran_as_a_notebook(service, tmp_path):
    import nbformat

    with scripted_model([hermes_call("y = 6 * 7\nprint(y)"), "It is 42."]) as model:
        shown = _cli(
            service, model.url, "--dialect", "hermes", "--notebook", "run.ipynb", cwd=tmp_path
        )
    assert shown.returncode == 0, shown.stderr
    assert "notebook saved: run.ipynb" in shown.stderr
    notebook = nbformat.read(tmp_path / "run.ipynb", as_version=4)
    nbformat.validate(notebook)
    (cell,) = notebook.cells
    assert cell.source == "y = 6 * 7\nprint(y)"
    assert cell.outputs[0].text == "42\n"
