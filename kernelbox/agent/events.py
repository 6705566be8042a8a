"""What the agent loop reports while it runs, and what it returns at the end."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from kernelbox_wire.models import Execution


class TextEvent(BaseModel):
    """Text from the model as it arrives, split where its kind changes: `thinking` inside
    `<think>…</think>` (the tags included); `call` from where a tool call starts (such as
    `<tool_call>`) to where generation stopped for it. A display may hide call text: if the
    call runs, a CodeEvent with its code follows; if not, a ToolErrorEvent, or more text (it
    was no call after all)."""

    kind: Literal["text"] = "text"
    text: str
    thinking: bool = False
    call: bool = False
    # "model": generated text; "request": what a delegating model asked the coder for
    role: Literal["model", "request"] = "model"


class CodeEvent(BaseModel):
    kind: Literal["code"] = "code"
    code: str
    index: int


class OutputEvent(BaseModel):
    kind: Literal["output"] = "output"
    execution: Execution
    index: int


class ToolErrorEvent(BaseModel):
    """A tool call the loop could not run; the model is told why and goes on."""

    kind: Literal["tool_error"] = "tool_error"
    message: str


class Step(BaseModel):
    """One tool call of the answer: the code run (or why none ran) and its result."""

    code: str | None = None
    request: str | None = None  # delegate: the computation asked for in words
    error: str | None = None
    execution: Execution | None = None


class AgentResult(BaseModel):
    question: str
    answer: str
    # The assistant text, insertions included (text dialects), exactly as the model saw it.
    transcript: str
    prompt: str = ""  # the rendered prompt before the assistant text (completions mode)
    messages: list[dict[str, Any]] = Field(default_factory=list)  # chat dialect
    steps: list[Step] = Field(default_factory=list)
    tool_calls: int = 0
    tokens: int = 0
    finish_reason: str = "stop"


class FinalEvent(BaseModel):
    kind: Literal["final"] = "final"
    result: AgentResult


AgentEvent = TextEvent | CodeEvent | OutputEvent | ToolErrorEvent | FinalEvent
