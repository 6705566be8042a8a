"""SandboxFusion's request and response models, field for field (its server's
`sandbox/server/sandbox_api.py` and `sandbox/runners/types.py`), so that its PyPI client and
the RL frameworks that post these bodies (verl, SimpleTIR, ToRL) work against kernelbox
unchanged. Only `language: "python"` and `"pytest"` run here; see
service/routes/sandboxfusion.py.

Field order, defaults and enum strings matter: clients parse the answers with these models
(pydantic v1 in the `sandbox-fusion` package), and nulls are sent, not left out.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

# Every language SandboxFusion's server or its PyPI client names (the client's list adds
# python2, gtest and react): each gets an answer the client treats as final, not a 422.
Language = Literal[
    "python",
    "python2",
    "cpp",
    "nodejs",
    "go",
    "go_test",
    "java",
    "php",
    "csharp",
    "bash",
    "typescript",
    "sql",
    "rust",
    "cuda",
    "lua",
    "R",
    "perl",
    "D_ut",
    "ruby",
    "scala",
    "julia",
    "pytest",
    "junit",
    "kotlin_script",
    "jest",
    "verilog",
    "python_gpu",
    "lean",
    "swift",
    "racket",
    "gtest",
    "react",
]


class RunStatus(StrEnum):
    Success = "Success"  # every command finished with return code 0
    Failed = "Failed"  # a non-zero return code, or a time limit
    SandboxError = "SandboxError"  # the sandbox failed, not the code


class CommandRunStatus(StrEnum):
    Finished = "Finished"
    Error = "Error"
    TimeLimitExceeded = "TimeLimitExceeded"


class CommandRunResult(BaseModel):
    status: CommandRunStatus
    execution_time: float | None = None  # seconds of wall time
    return_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None


class RunCodeRequest(BaseModel):
    compile_timeout: float = Field(10, description="compile timeout for compiled languages")
    run_timeout: float = Field(10, description="code run timeout")
    memory_limit_MB: int = Field(-1, description="maximum memory allowed in megabytes")
    code: str = Field(..., examples=['print("hello")'], description="the code to run")
    stdin: str | None = Field(None, examples=[""], description="optional string to pass into stdin")
    language: Language = Field(
        ..., examples=["python"], description="the language or execution mode to run the code"
    )
    files: dict[str, str | None] = Field(
        {}, description="a dict from file path to base64 encoded file content"
    )
    fetch_files: list[str] = Field(
        [], description="a list of file paths to fetch after code execution"
    )
    args: list[str] = Field([], description="additional command-line arguments passed to pytest")


class RunCodeResponse(BaseModel):
    status: RunStatus
    message: str
    compile_result: CommandRunResult | None = None
    run_result: CommandRunResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = {}


class RunJupyterRequest(BaseModel):
    cells: list[str] = Field(
        ...,
        examples=[
            [
                "a = 123",
                "a",
                "print(a)",
                'import sys; sys.stderr.write("stderr message")',
                'raise RuntimeError("error message")',
            ]
        ],
        description="list of code blocks to run in jupyter notebook",
    )
    cell_timeout: float = Field(0, description="max run time for each of the cells")
    total_timeout: float = Field(45, description="max run time for all the cells")
    memory_limit_MB: int = Field(-1, description="maximum memory allowed in megabytes")
    kernel: Literal["python3"] = "python3"
    files: dict[str, str] = Field(
        {}, description="a dict from file path to base64 encoded file content"
    )
    fetch_files: list[str] = Field(
        [], description="a list of file paths to fetch after code execution"
    )


class CellRunResult(BaseModel):
    stdout: str
    stderr: str
    display: list[dict[str, Any]]
    error: list[dict[str, Any]]


class RunJupyterResponse(BaseModel):
    status: RunStatus
    message: str
    driver: CommandRunResult | None = None
    cells: list[CellRunResult] = []
    executor_pod_name: str | None = None
    files: dict[str, str] = {}
