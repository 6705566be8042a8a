"""Typed events of a streamed execution, in the order the service sends them.

`stdout`/`stderr` chunks, rich `result`s and the `error` arrive as they happen; `EndEvent`
comes last and carries the whole `Execution`. A deadline or a dead kernel is only known at the
end: the stream then yields an `ErrorEvent` for it just before `EndEvent`, so a consumer that
prints errors as they come sees every one.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .models import ErrorInfo, Execution, Result


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)


class StdoutEvent(_Event):
    type: Literal["stdout"] = "stdout"
    text: str


class StderrEvent(_Event):
    type: Literal["stderr"] = "stderr"
    text: str


class ResultEvent(_Event):
    type: Literal["result"] = "result"
    result: Result


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    error: ErrorInfo


class EndEvent(_Event):
    type: Literal["end"] = "end"
    execution: Execution


Event = Annotated[
    StdoutEvent | StderrEvent | ResultEvent | ErrorEvent | EndEvent, Field(discriminator="type")
]
