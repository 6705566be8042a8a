"""A session's history as a notebook: GET /v1/sessions/{id}/notebook, over real HTTP from a
real service, valid by nbformat's own validator, and re-run in a fresh kernel to the same
outputs. The history's bounds and what it leaves out of a kernel's data are checked on the
engine's own types."""

from __future__ import annotations

import base64
import json

import httpx
import nbformat
import pytest

from kernelbox import Client
from kernelbox_server.sandbox.history import SessionHistory, to_notebook
from kernelbox_wire.models import ErrorInfo, Execution, OutputRef, Result
from tests.server import running_server

KEY_A, KEY_B = "notebook-key-a", "notebook-key-b"
CELLS = [
    "x = 6 * 7",
    "print(x)",
    "import sys; print('to stderr', file=sys.stderr)",
    "plt.plot([1, 4, 9]); plt.show()",
    "pd.DataFrame({'a': [1, 2]})",
    "1 / 0",
    "x + 1",
]


@pytest.fixture(scope="module")
def server():
    with running_server(min_idle=2, api_key=[KEY_A, KEY_B]) as srv:
        yield srv


def streams_and_values(cell: dict) -> list[tuple[str, str]]:
    """What a re-run must reproduce: stream text and the results' plain text."""
    seen = []
    for out in cell["outputs"]:
        if out["output_type"] == "stream":
            seen.append((out["name"], out["text"]))
        elif out["output_type"] in ("execute_result", "display_data"):
            seen.append((out["output_type"], out["data"].get("text/plain", "")))
        elif out["output_type"] == "error":
            seen.append(("error", out["ename"]))
    return seen


def test_the_history_is_a_valid_notebook_that_reruns_to_the_same_outputs(server, tmp_path):
    with Client(server.url, KEY_A) as client, client.create_session() as session:
        for code in CELLS:
            session.execute(code)
        answer = httpx.get(
            f"{server.url}/v1/sessions/{session.id}/notebook",
            headers={"Authorization": f"Bearer {KEY_A}"},
        )
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/x-ipynb+json"
        assert f'filename="{session.id}.ipynb"' in answer.headers["content-disposition"]
        saved = session.save_notebook(tmp_path / "history.ipynb")
    notebook = nbformat.read(saved, as_version=4)
    nbformat.validate(notebook)
    cells = notebook.cells
    assert [c.source for c in cells] == CELLS
    assert [c.execution_count for c in cells] == list(range(1, len(CELLS) + 1))
    assert streams_and_values(cells[1]) == [("stdout", "42\n")]
    assert streams_and_values(cells[2]) == [("stderr", "to stderr\n")]
    (plot,) = cells[3].outputs
    assert plot.output_type == "display_data"
    assert base64.b64decode(plot.data["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")
    (table,) = cells[4].outputs
    assert "<table" in table.data["text/html"] and table.execution_count == 5
    assert cells[5].outputs[0].ename == "ZeroDivisionError"
    assert cells[6].outputs[0].data["text/plain"] == "43"

    # The notebook's code, run again in a fresh kernel, shows the same.
    with Client(server.url, KEY_A) as client, client.create_session() as fresh:
        for cell in cells:
            fresh.execute(cell.source)
        rerun = nbformat.reads(json.dumps(fresh.notebook()), as_version=4)
    for before, after in zip(cells, rerun.cells, strict=True):
        assert streams_and_values(after) == streams_and_values(before)


def test_another_keys_session_has_no_notebook(server):
    with Client(server.url, KEY_A) as client, client.create_session() as session:
        session.execute("secret = 1")
        answer = httpx.get(
            f"{server.url}/v1/sessions/{session.id}/notebook",
            headers={"Authorization": f"Bearer {KEY_B}"},
        )
        assert answer.status_code == 404
        assert "secret" not in answer.text


def ran(text: str) -> Execution:
    return Execution(
        status="ok", stdout=text, outputs=[OutputRef(type="stream", name="stdout", text=text)]
    )


def test_the_history_keeps_the_newest_cells_within_its_bounds_and_says_so():
    history = SessionHistory(max_cells=3, max_bytes=1000)
    for i in range(5):
        history.add(f"print({i})", ran(f"{i}\n"))
    assert [c.code for c in history.cells()] == ["print(2)", "print(3)", "print(4)"]
    history.add("big", ran("x" * 990))  # over the byte bound with what came before
    assert [c.code for c in history.cells()] == ["big"] and history.dropped == 5
    notebook = nbformat.reads(to_notebook(history.cells(), history.dropped), as_version=4)
    assert notebook.cells[0].cell_type == "markdown"
    assert "5 earlier cells" in notebook.cells[0].source


def test_what_a_kernel_sends_that_nbformat_refuses_is_left_out():
    execution = Execution(
        status="timeout",
        results=[
            Result(
                type="display_data",
                data={
                    "text/plain": ["a", "b"],  # a list of lines: joined
                    "not a mime type": "dropped",
                    "application/json": {"k": [1, 2]},
                    "text/html": 5,  # not text: dropped
                },
            )
        ],
        outputs=[OutputRef(type="result", index=0)],
        # An error the outputs' order does not place comes last.
        error=ErrorInfo(name="TimeoutError", value="Timed out (1 s)"),
    )
    history = SessionHistory()
    history.add("import time; time.sleep(99)", execution)
    notebook = nbformat.reads(to_notebook(history.cells()), as_version=4)
    nbformat.validate(notebook)
    display, timeout = notebook.cells[0].outputs
    assert display.data == {"text/plain": "ab", "application/json": {"k": [1, 2]}}
    assert (timeout.ename, timeout.evalue) == ("TimeoutError", "Timed out (1 s)")
