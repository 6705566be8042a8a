"""Render an `Execution` for a model locally, with the very code the service uses
(`kernelbox_wire.render`, pure: stdlib and the wire models)."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from kernelbox_wire.models import Envelope, Execution, Format, RenderOptions, Style, render_options
from kernelbox_wire.render import render_message

# The HTTP API's `format` field: a style, an envelope, or RenderOptions (also as a plain dict,
# as it arrives in JSON). Validated here the same way, so both take the same values.
_FORMAT: TypeAdapter[Format] = TypeAdapter(Format)


def render(
    execution: Execution,
    format: Format | dict[str, Any] | None = None,
    *,
    style: Style | None = None,
    envelope: Envelope | None = None,
    multimodal: bool | None = None,
    max_chars: int | None = None,
    tool_call_id: str | None = None,
) -> str | dict[str, Any]:
    """The model-ready rendering of `execution`, without a round trip to the service.

    `format` is what the HTTP API takes (a style, an envelope, or `RenderOptions` or its
    dict, e.g. `{"style": "plain", "envelope": "output_block"}`); the
    keywords override parts of it. An envelope named alone gets its natural style, as in the
    API. Text envelopes give a `str`; `openai` and `function` give the message dict.

        render(execution)                                  # qwen body, as text
        render(execution, "plain")                         # the RL-prompt body
        render(execution, envelope="tool_response")        # <tool_response>...</tool_response>
        render(execution, "openai", tool_call_id=call.id)  # {"role": "tool", ...}
    """
    fmt = format if format is not None else envelope
    options = render_options(_FORMAT.validate_python(fmt) if fmt is not None else None)
    overrides = {
        "style": style,
        "envelope": envelope,
        "multimodal": multimodal,
        "max_chars": max_chars,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        options = RenderOptions.model_validate({**options.model_dump(), **overrides})
    return render_message(execution, options, tool_call_id=tool_call_id)
