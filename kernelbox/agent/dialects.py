"""The ways models ask for code to run: each dialect has its prompt, stop strings, parser and
insertion (formats from the Qwen templates, Qwen-Agent, ToRL and modelscope-agent, see
docs/agent.md). What a dialect inserts is the rendering's own envelope (kernelbox_wire.envelopes),
plus the line breaks that let generation continue.

A dialect sees the text the model wrote since the last insertion (`segment`, which ends where
generation stopped, the stop string itself excluded as servers return it) and answers:
`Call` (run this), `Malformed` (tell the model what was wrong), or None (no call: the model
is done). `insertion` is the exact text appended after the call before generation continues.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from kernelbox_wire.envelopes import ENVELOPES
from kernelbox_wire.tools import CODE_INTERPRETER_TOOL, TOOL_NAME, InvalidArguments, extract_code


@dataclass
class Call:
    code: str = ""
    # delegate: what the reasoning model asked for in words
    request: str = ""


@dataclass
class Malformed:
    message: str


Parsed = Call | Malformed | None


def code_call(name: Any, arguments: Any) -> Parsed:
    """A call of `code_interpreter` with its arguments in any form models write them."""
    if name != TOOL_NAME:
        return Malformed(f"unknown tool {name!r}; the tool is {TOOL_NAME!r}")
    try:
        return Call(code=extract_code(arguments))
    except InvalidArguments as exc:
        return Malformed(str(exc))


def _loads(text: str) -> Any:
    # strict=False: models put raw newlines and tabs inside JSON strings.
    return json.loads(text, strict=False)


class Dialect:
    name: str = ""
    stop: tuple[str, ...] = ()
    # Which body style the inserted result uses (kernelbox_wire.render: "qwen" or "plain").
    style: str = "qwen"
    # Chat dialects call the model with native tools and role "tool" messages instead.
    native_tools: bool = False
    # Where a tool call starts in the model's text (what follows is the call, not prose).
    call_start: tuple[str, ...] = ()

    def system_prompt(self, system: str | None) -> str:
        return system or ""

    def parse(self, segment: str, stopped_at: str | None) -> Parsed:
        raise NotImplementedError

    def insertion(self, segment: str, stopped_at: str | None, body: str) -> str:
        raise NotImplementedError

    def answer(self, text: str) -> str:
        """The final answer from the text after the last insertion."""
        return text.split("</think>")[-1].strip()


# -- hermes -----------------------------------------------------------------------------------

HERMES_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)

_XML_PARAM = re.compile(r"<parameter=code>\n?(.*?)(?:\n?</parameter>|$)", re.DOTALL)
_XML_FUNCTION = re.compile(r"<function=([^>\s]+)>")


class Hermes(Dialect):
    """Qwen2.5 / QwQ / Qwen3: `<tool_call>{"name", "arguments"}</tool_call>`; the result goes in
    `<tool_response>` in the same assistant turn, inside `<think>` too."""

    name = "hermes"
    stop = ("</tool_call>",)
    call_start = ("<tool_call>",)
    tool: dict[str, Any] = CODE_INTERPRETER_TOOL

    def system_prompt(self, system: str | None) -> str:
        tools = "\n" + json.dumps(self.tool, ensure_ascii=False)
        return f"{system}\n\n" * bool(system) + HERMES_TOOLS.format(tools=tools)

    def parse(self, segment: str, stopped_at: str | None) -> Parsed:
        start = segment.rfind("<tool_call>")
        if start < 0:
            return None
        return self.parse_call(segment[start + len("<tool_call>") :].strip())

    def parse_call(self, body: str) -> Parsed:
        body = body.removesuffix("</tool_call>").strip()
        if body.startswith("<function="):  # the Qwen3-Coder XML form
            name = _XML_FUNCTION.match(body)
            if name and name.group(1) != TOOL_NAME:
                return Malformed(f"unknown tool {name.group(1)!r}; the tool is {TOOL_NAME!r}")
            param = _XML_PARAM.search(body)
            if not param:
                return Malformed("the call has no <parameter=code> with the code to run")
            return Call(code=param.group(1))
        code_part = None
        if "<code>" in body:  # Qwen-Agent's code mode: JSON with a placeholder, then <code>
            body, _, code_part = body.partition("<code>")
            code_part = code_part.replace("</code>", "").strip("\n")
        try:
            call = _loads(body.strip())
        except ValueError as exc:
            return Malformed(f"the tool call is not valid JSON ({exc})")
        if not isinstance(call, dict):
            return Malformed('the tool call must be a JSON object {"name": ..., "arguments": ...}')
        name = call.get("name", call.get("action"))
        arguments = call.get("arguments", call.get("action_input"))
        return self.call_from(name, arguments, code_part)

    def call_from(self, name: Any, arguments: Any, code_part: str | None) -> Parsed:
        if code_part is not None and name == TOOL_NAME:
            return Call(code=code_part)
        return code_call(name, arguments)

    def insertion(self, segment: str, stopped_at: str | None, body: str) -> str:
        close = "" if segment.rstrip().endswith("</tool_call>") else "</tool_call>"
        return f"{close}\n{ENVELOPES['tool_response'].wrap(body)}\n"


# -- tir --------------------------------------------------------------------------------------

TIR_SYSTEM = (
    "Please integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{}."
)


def last_python_block(text: str) -> str | None:
    """The last complete ```python block (Qwen-Agent's TIR rule: an unclosed one is no call)."""
    program, inside, found = [], False, None
    for line in text.split("\n"):
        if line.startswith("```python") or line.startswith("```py"):
            program, inside = [], True
        elif line.startswith("```") and inside:
            found, inside = "\n".join(program), False
        elif inside:
            program.append(line)
    return found


class Tir(Dialect):
    """Qwen2.5-Math TIR and ToRL: a ```python block, stop at ```output, insert the output."""

    name = "tir"
    stop = ("```output",)
    call_start = ("```py",)  # ```python too
    style = "plain"

    def system_prompt(self, system: str | None) -> str:
        return system or TIR_SYSTEM

    def parse(self, segment: str, stopped_at: str | None) -> Parsed:
        if stopped_at is None and not segment.rstrip().endswith("```"):
            return None  # ended on its own: the answer
        code = last_python_block(segment)
        if code is None:
            if stopped_at is None:
                return None
            return Malformed("no complete ```python code block before ```output")
        return Call(code=code)

    def insertion(self, segment: str, stopped_at: str | None, body: str) -> str:
        lead = "" if segment.endswith("\n") else "\n"
        return lead + ENVELOPES["output_block"].wrap(body)


# -- react ------------------------------------------------------------------------------------

REACT_TOOLS = (
    "# Tools\n\n## You have the following tools:\n\n{name}: {name} API. {description} "
    'Parameters: [{{"name": "code", "type": "string", "description": "The Python code to run."}}] '
    "Format the arguments as a JSON object.\n\n"
    "## When you need to call a tool, please intersperse the following tool command in your "
    "reply. You can call zero or more times according to your needs:\n\n"
    "Tool Invocation\nAction: The name of the tool, must be one of [{name}]\n"
    "Action Input: Tool input\nObservation: <result>Tool returns result</result>\n"
    "Answer: Summarize the results of this tool call based on Observation.\n"
)


class React(Dialect):
    """ModelScope AgentFabric / modelscope-agent: `Action:` / `Action Input:`, stop at
    `Observation:`, insert `Observation: <result>…</result>`."""

    name = "react"
    stop = ("Observation:",)
    call_start = ("Action:",)

    def system_prompt(self, system: str | None) -> str:
        tools = REACT_TOOLS.format(
            name=TOOL_NAME, description=CODE_INTERPRETER_TOOL["function"]["description"]
        )
        return f"{system}\n\n{tools}" if system else tools

    def parse(self, segment: str, stopped_at: str | None) -> Parsed:
        action_at = segment.rfind("Action:")
        if action_at < 0:
            return None
        rest = segment[action_at + len("Action:") :]
        name, sep, arguments = rest.partition("Action Input:")
        if not sep:
            return Malformed("an Action without an 'Action Input:' line")
        return code_call(name.strip(), arguments.strip())

    def insertion(self, segment: str, stopped_at: str | None, body: str) -> str:
        lead = "" if segment.endswith("\n") else "\n"
        return f"{lead}{ENVELOPES['react'].wrap(body)}\n"

    def answer(self, text: str) -> str:
        text = super().answer(text)
        for marker in ("Final Answer:", "Answer:"):
            if marker in text:
                return text.rsplit(marker, 1)[1].strip()
        return text


# -- qwen_fn ----------------------------------------------------------------------------------

FN_NAME, FN_ARGS, FN_RESULT, FN_EXIT = "✿FUNCTION✿", "✿ARGS✿", "✿RESULT✿", "✿RETURN✿"

QWEN_FN_TOOLS = (
    "# Tools\n\n## You have access to the following tools:\n\n### {name}\n\n{name}: "
    "{description} Parameters: {parameters} Enclose the code within triple backticks (`) at "
    "the beginning and end of the code.\n\n"
    "## When you need to call a tool, please insert the following command in your reply, "
    "which can be called zero or multiple times according to your needs:\n\n"
    f"{FN_NAME}: The tool to use, should be one of [{{name}}]\n{FN_ARGS}: The input of the tool\n"
    f"{FN_RESULT}: Tool results\n{FN_EXIT}: Reply based on tool results. Images need to be "
    "rendered as ![](url)"
)


class QwenFn(Dialect):
    """Qwen-Agent's function-call prompt: `✿FUNCTION✿`/`✿ARGS✿`, stop at `✿RESULT✿`."""

    name = "qwen_fn"
    stop = (FN_RESULT, FN_EXIT)
    call_start = (FN_NAME,)

    def system_prompt(self, system: str | None) -> str:
        fn = CODE_INTERPRETER_TOOL["function"]
        tools = QWEN_FN_TOOLS.format(
            name=TOOL_NAME,
            description=fn["description"],
            parameters=json.dumps([{"name": "code", "type": "string", "required": True}]),
        )
        return f"{system}\n\n{tools}" if system else tools

    def parse(self, segment: str, stopped_at: str | None) -> Parsed:
        at = segment.rfind(FN_NAME)
        if at < 0:
            return None
        name, sep, arguments = segment[at + len(FN_NAME) :].partition(FN_ARGS)
        if not sep:
            return Malformed(f"a {FN_NAME} line without {FN_ARGS}")
        return code_call(name.strip().lstrip(":").strip(), arguments.lstrip(":").strip())

    def insertion(self, segment: str, stopped_at: str | None, body: str) -> str:
        lead = "" if segment.endswith("\n") else "\n"
        return lead + ENVELOPES["qwen_fn"].wrap(body)

    def answer(self, text: str) -> str:
        return super().answer(text).lstrip(":").strip()


# -- chat (native tools) ----------------------------------------------------------------------


class Chat(Dialect):
    """Native OpenAI tool calling: `tool_calls` in, `role: tool` messages back."""

    name = "chat"
    native_tools = True

    def parse(self, segment: str, stopped_at: str | None) -> Parsed:
        return None

    def insertion(self, segment: str, stopped_at: str | None, body: str) -> str:
        return body


# -- delegate ---------------------------------------------------------------------------------

COMPUTE_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "compute",
        "description": (
            "Ask a Python expert to compute something for you. Describe the computation "
            "precisely in words: the inputs with their exact values, and what to print."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "request": {"type": "string", "description": "The computation, in words."}
            },
            "required": ["request"],
        },
    },
}

# What every backend's kernels have: the local backend runs kernels with the service's own
# interpreter, whose data stack is numpy, pandas and matplotlib (the Docker image has more).
CODER_PACKAGES = ("numpy", "pandas", "matplotlib")
CODER_SYSTEM = (
    "You write one self-contained Python 3 program that performs exactly the requested "
    "computation and prints the results with labels. Besides the standard library, only "
    f"{', '.join(CODER_PACKAGES[:-1])} and {CODER_PACKAGES[-1]} are available. Answer with "
    "one ```python code block and nothing else."
)


class Delegate(Hermes):
    """The reasoning model asks in words (a hermes-style `compute` call); a coder model writes
    the code; the sandbox runs it; the code and its output go back in `<tool_response>`."""

    name = "delegate"
    tool = COMPUTE_TOOL

    def call_from(self, name: Any, arguments: Any, code_part: str | None) -> Parsed:
        if name != "compute":
            return Malformed(f"unknown tool {name!r}; the tool is 'compute'")
        if isinstance(arguments, str):
            try:
                arguments = _loads(arguments)
            except ValueError:
                arguments = {"request": arguments}
        request = arguments.get("request") if isinstance(arguments, dict) else None
        if not isinstance(request, str) or not request.strip():
            return Malformed('the call needs {"request": "<the computation, in words>"}')
        return Call(request=request.strip())

    @staticmethod
    def coder_messages(request: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": CODER_SYSTEM}, {"role": "user", "content": request}]

    @staticmethod
    def delegated_body(code: str, body: str) -> str:
        return f"# code\n{code}\n# output\n{body}"


DIALECTS: dict[str, type[Dialect]] = {
    d.name: d for d in (Hermes, Tir, React, QwenFn, Chat, Delegate)
}


def get_dialect(name: str) -> Dialect:
    try:
        return DIALECTS[name]()
    except KeyError:
        raise ValueError(f"unknown dialect {name!r}; choose from {sorted(DIALECTS)}") from None
