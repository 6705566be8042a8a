"""The wire schema: one definition shared by the engine, the service and the client.

Field names of `Execution` and `Session` are fixed by the HTTP contract (README, "HTTP API");
fields added here only extend it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

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
    # What the host left out or changed, in words (output over a limit, an image not saved, a
    # kernel replaced between calls); `truncated` is true when output was left out.
    notes: list[str] = Field(default_factory=list)
    # The session had been paused and this execution resumed it in a fresh kernel, with its
    # variables restored except those named here (name -> why).
    resumed: bool = False
    not_restored: dict[str, str] = Field(default_factory=dict)


class RenderOptions(_Model):
    """How an `Execution` becomes model-ready text (see `kernelbox_wire.render`)."""

    style: Style = "qwen"
    envelope: Envelope = "text"
    multimodal: bool = False
    max_chars: int = Field(default=20_000, ge=200)


class Session(_Model):
    id: str
    #: lost: the machine that ran it is gone (a cluster), with its kernel and files
    status: Literal["idle", "busy", "restarting", "paused", "closed", "lost"]
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime | None
    execution_count: int
    metadata: dict[str, Any] = Field(default_factory=dict)


# -- requests and responses of the HTTP API ---------------------------------------------------

# `format`: a style ("qwen", "plain"), an envelope name (body in the qwen style), or the whole
# RenderOptions object.
Format = RenderOptions | Style | Envelope


def render_options(fmt: Format | None, default_envelope: Envelope = "text") -> RenderOptions:
    """Resolve a `format` field. An envelope named alone gets its natural style: the
    ```output block of TIR/RL prompts holds raw output (`plain`); the others `qwen`."""
    if isinstance(fmt, RenderOptions):
        return fmt
    if fmt in get_args(Style):
        return RenderOptions(style=fmt, envelope=default_envelope)  # type: ignore[arg-type]
    envelope = fmt or default_envelope
    style = "plain" if envelope == "output_block" else "qwen"
    return RenderOptions(style=style, envelope=envelope)  # type: ignore[arg-type]


# An environment variable as a shell would accept it; KERNELBOX_* are the sandbox's own.
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)]
EnvValue = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$", max_length=32_768)]


class CreateSessionRequest(_Model):
    model_config = ConfigDict(extra="forbid")

    idle_timeout: float | None = Field(
        default=None,
        gt=0,
        description="Seconds without use before the session is reaped (capped by the "
        "service's maximum).",
    )
    env: dict[EnvName, EnvValue] | None = Field(
        default=None,
        max_length=256,
        description="Environment variables for the code (names as a shell takes them, not "
        "KERNELBOX_*; values without NUL).",
        examples=[{"MY_SETTING": "1"}],
    )
    metadata: dict[str, Any] | None = Field(default=None, examples=[{"user": "alice"}])

    @field_validator("env")
    @classmethod
    def _not_ours(cls, env: dict[str, str] | None) -> dict[str, str] | None:
        reserved = [name for name in env or {} if name.upper().startswith("KERNELBOX_")]
        if reserved:
            raise ValueError(f"KERNELBOX_* variables are the sandbox's own: {reserved}")
        return env


class ExecuteRequest(_Model):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(examples=["x = 21 * 2\nprint(x)"])
    timeout: float | None = Field(default=None, gt=0, description="Deadline in seconds.")
    format: Format | None = Field(
        default=None,
        description="Also render the result for a model into `text`: a style "
        "(`qwen`, `plain`), an envelope (`tool_response`, `output_block`, `react`, `qwen_fn`, "
        "...), or a RenderOptions object.",
        examples=["qwen"],
    )
    stream: bool = Field(default=False, description="Answer as server-sent events.")


class ToolCallRequest(_Model):
    model_config = ConfigDict(extra="forbid")

    session_id: str | None = Field(
        default=None, description="Omit to get a new session; its id comes back."
    )
    arguments: str | dict[str, Any] = Field(
        description="The model's tool-call arguments: the JSON string or the parsed object.",
        examples=['{"code": "x = 1"}'],
    )
    tool_call_id: str | None = Field(default=None, examples=["call_abc123"])
    format: Format | None = Field(default=None, examples=["openai"])
    timeout: float | None = Field(default=None, gt=0)


class ToolCallResponse(_Model):
    session_id: str
    message: dict[str, Any] | str
    execution: Execution | None = None


class RenderRequest(_Model):
    model_config = ConfigDict(extra="forbid")

    execution: Execution = Field(description="An Execution, as an execute call returned it.")
    format: Format | None = Field(
        default=None,
        description="As `format` of an execute call: a style, an envelope, or RenderOptions.",
        examples=["tool_response"],
    )


class RenderResponse(_Model):
    text: str = Field(description="The model-ready text, in its envelope.")
    message: dict[str, Any] | str = Field(
        description="The whole tool message (a chat message for `openai`/`function`)."
    )


class FileEntry(_Model):
    path: str
    size: int
    modified: datetime


class ErrorDetail(_Model):
    code: str
    message: str
    fields: list[dict[str, Any]] | None = None


class ErrorBody(_Model):
    error: ErrorDetail
