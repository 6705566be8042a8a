"""The wire schema: one definition shared by the engine, the service and the client.

Field names of `Execution` and `Session` are fixed by the HTTP contract (PRODUCT.md);
fields added here only extend it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ExecutionStatus = Literal["ok", "error", "timeout", "died"]
Style = Literal["qwen", "plain"]
Envelope = Literal[
    "text", "openai", "function", "tool_response", "output_block", "react", "qwen_fn"
]


class _Model(BaseModel):
    # Unknown fields are ignored so an older client keeps working against a newer server.
    model_config = ConfigDict(extra="ignore")


class ErrorInfo(_Model):
    """An exception raised by the code (or the deadline / a dead kernel), ANSI stripped."""

    name: str
    value: str
    traceback: list[str] = Field(default_factory=list)


class Result(_Model):
    """An `execute_result` or `display_data` output with every MIME type the kernel sent."""

    type: Literal["execute_result", "display_data"]
    data: dict[str, Any] = Field(default_factory=dict)
    # Paths (relative to the session's working directory) of the image files saved from `data`.
    images: list[str] = Field(default_factory=list)


class Image(_Model):
    path: str = Field(examples=["outputs/fig-001.png"])
    url: str
    mime: str = Field(examples=["image/png"])


class OutputRef(_Model):
    """One entry of the order in which output arrived, so renderings can interleave it.

    `stream` entries carry their text (consecutive chunks of one stream merged);
    `result` entries point into `Execution.results`; `error` stands for `Execution.error`.
    """

    type: Literal["stream", "result", "error"]
    name: Literal["stdout", "stderr"] | None = None
    text: str | None = None
    index: int | None = None


class Execution(_Model):
    status: ExecutionStatus
    execution_count: int | None = None
    stdout: str = ""
    stderr: str = ""
    results: list[Result] = Field(default_factory=list)
    error: ErrorInfo | None = None
    images: list[Image] = Field(default_factory=list)
    duration_ms: float = 0.0
    truncated: bool = False
    kernel_restarted: bool = False
    text: str | None = None
    outputs: list[OutputRef] = Field(default_factory=list)


class RenderOptions(_Model):
    """How an `Execution` becomes model-ready text (see `sandbox.render`)."""

    style: Style = "qwen"
    envelope: Envelope = "text"
    multimodal: bool = False
    max_chars: int = Field(default=20_000, ge=200)


class Session(_Model):
    id: str
    status: Literal["idle", "busy", "restarting", "closed"]
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime | None
    execution_count: int
    metadata: dict[str, Any] = Field(default_factory=dict)
