"""What a session ran and showed, in order, and its export as a Jupyter notebook.

Each execution's code and its Execution (streams, results with their MIME data, images as the
kernel sent them in base64, the error) are kept so `GET /v1/sessions/{id}/notebook` can give
the session back as an `.ipynb`. What the kernel sent is bounded already per execution
(capture.py); the history bounds it per session too, by cells and by bytes, dropping the
oldest first and saying so at the top of the notebook.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass
from typing import Any

import nbformat
from nbformat import v4

from kernelbox_wire.models import ErrorInfo, Execution

#: nbformat's rule for a MIME key; anything else the kernel sent is left out of the notebook
MIME_KEY = re.compile(r"^[a-zA-Z0-9]+/[a-zA-Z0-9\-\+\.]+$")


@dataclass(frozen=True)
class Cell:
    code: str
    execution: Execution
    size: int


def _size(code: str, execution: Execution) -> int:
    """About the bytes a cell holds: its code and every string of its output."""
    size = len(code) + len(execution.stdout) + len(execution.stderr)
    for result in execution.results:
        for value in result.data.values():
            size += len(value) if isinstance(value, str) else len(json.dumps(value))
    if execution.error is not None:
        size += sum(len(line) for line in execution.error.traceback) + len(execution.error.value)
    return size


class SessionHistory:
    def __init__(self, max_cells: int = 1000, max_bytes: int = 32 * 1024**2) -> None:
        self.max_cells = max_cells
        self.max_bytes = max_bytes
        self._cells: deque[Cell] = deque()
        self._bytes = 0
        #: cells dropped to stay within the bounds, oldest first
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._cells)

    def add(self, code: str, execution: Execution) -> None:
        """Keep a cell (a copy: the caller may go on changing its Execution)."""
        cell = Cell(code, execution.model_copy(deep=True), _size(code, execution))
        self._cells.append(cell)
        self._bytes += cell.size
        while self._cells and (len(self._cells) > self.max_cells or self._bytes > self.max_bytes):
            self._bytes -= self._cells.popleft().size
            self.dropped += 1

    def cells(self) -> list[Cell]:
        return list(self._cells)


def _mime_bundle(data: dict[str, Any]) -> dict[str, Any]:
    """The kernel's data as nbformat takes it: valid MIME keys, text values (JSON for JSON)."""
    bundle: dict[str, Any] = {}
    for key, value in data.items():
        if not MIME_KEY.match(key):
            continue
        if key == "application/json" or key.endswith("+json"):
            bundle[key] = value
        elif isinstance(value, str):
            bundle[key] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            bundle[key] = "".join(value)
    return bundle


def _error_output(error: ErrorInfo) -> Any:
    return v4.new_output("error", ename=error.name, evalue=error.value, traceback=error.traceback)


def _outputs(execution: Execution) -> list[Any]:
    outputs = []
    for out in execution.outputs:
        if out.type == "stream" and out.text:
            outputs.append(v4.new_output("stream", name=out.name or "stdout", text=out.text))
        elif out.type == "result" and out.index is not None:
            result = execution.results[out.index]
            data = _mime_bundle(result.data)
            if result.type == "execute_result":
                count = execution.execution_count
                outputs.append(v4.new_output("execute_result", data=data, execution_count=count))
            else:
                outputs.append(v4.new_output("display_data", data=data))
        elif out.type == "error" and execution.error is not None:
            outputs.append(_error_output(execution.error))
    if execution.error is not None and not any(o.type == "error" for o in execution.outputs):
        outputs.append(_error_output(execution.error))  # an error the order does not place
    return outputs


def to_notebook(cells: list[Cell], dropped: int = 0) -> str:
    """The cells as an nbformat-4 notebook (JSON text), checked by nbformat's validator;
    `dropped` earlier cells are said to be missing at the top."""
    notebook = v4.new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    notebook.metadata["language_info"] = {"name": "python"}
    if dropped:
        notebook.cells.append(
            v4.new_markdown_cell(
                f"*{dropped} earlier cells of this session are not included: the "
                "session keeps its most recent cells within its history limits.*"
            )
        )
    for cell in cells:
        code_cell = v4.new_code_cell(cell.code, execution_count=cell.execution.execution_count)
        code_cell.outputs = _outputs(cell.execution)
        if cell.execution.kernel_restarted:
            code_cell.metadata["kernelbox"] = {"kernel_restarted": True}
        notebook.cells.append(code_cell)
    nbformat.validate(notebook)
    return nbformat.writes(notebook)
