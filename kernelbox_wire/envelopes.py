"""The text envelopes: what a model sees around an output body, in its own dialect.

One registry for the renderers (the `envelope` of a `format`) and the agent loop's dialects
(what they insert after a call), so that both write exactly the same bytes. `openai` and
`function` are message envelopes (a chat message dict, built by `render.render_message`), so
they have no entry here: their body goes bare.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextEnvelope:
    name: str
    head: str
    tail: str

    def wrap(self, body: str) -> str:
        return f"{self.head}{body}{self.tail}"


ENVELOPES: dict[str, TextEnvelope] = {
    e.name: e
    for e in (
        TextEnvelope("text", "", ""),
        TextEnvelope("tool_response", "<tool_response>\n", "\n</tool_response>"),
        TextEnvelope("output_block", "```output\n", "\n```\n"),
        TextEnvelope("react", "Observation: <result>", "</result>"),
        TextEnvelope("qwen_fn", "✿RESULT✿: ", "\n✿RETURN✿"),
    )
}


def wrap(body: str, envelope: str) -> str:
    """`body` in the text envelope `envelope` (bare for a message envelope)."""
    found = ENVELOPES.get(envelope)
    return found.wrap(body) if found else body
