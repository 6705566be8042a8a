"""The `code_interpreter` tool as models see it, and its arguments as models write them."""

from __future__ import annotations

import json
import re
from typing import Any

TOOL_NAME = "code_interpreter"

TOOL_DESCRIPTION = (
    "Run Python code in a stateful Jupyter kernel and see its output. Variables, imports and "
    "files persist between calls. numpy (np), pandas (pd) and matplotlib.pyplot (plt) are "
    "already imported; plots are shown as images. There is no network access and no input()."
)

CODE_INTERPRETER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": TOOL_DESCRIPTION,
        "parameters": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "The Python code to run."},
            },
            "required": ["code"],
        },
    },
}

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:\n)?```", re.DOTALL)


class InvalidArguments(ValueError):
    """The model's arguments hold no code we can run; the message is meant for the model."""


def extract_code(arguments: str | dict[str, Any] | None) -> str:
    """The code in a tool call's arguments, tolerant of what models really send.

    Accepts the parsed object, its JSON string, a markdown code fence, or bare code (as
    Qwen-Agent does). A JSON object without a string `code` is an error the model can fix.
    """
    if arguments is None:
        raise InvalidArguments('the tool call has no arguments; expected {"code": "..."}')
    if isinstance(arguments, str):
        text = arguments.strip()
        try:
            parsed = json.loads(text)
        except ValueError:
            if text.startswith("{"):
                raise InvalidArguments(
                    'the arguments are not valid JSON; expected {"code": "..."}'
                ) from None
            fenced = _FENCE.search(text)
            return fenced.group(1) if fenced else text
        if isinstance(parsed, str):
            return parsed
        arguments = parsed
    if not isinstance(arguments, dict):
        raise InvalidArguments('the arguments must be a JSON object like {"code": "..."}')
    code = arguments.get("code")
    if not isinstance(code, str):
        raise InvalidArguments("the arguments have no string field 'code'")
    return code
