"""Our `qwen` rendering against the real Qwen-Agent code_interpreter, on the same kind of kernel.

Qwen-Agent's own `_execute_code` runs on one of our kernels (it only needs a jupyter client);
the engine runs the same code on another; the texts must be equal byte for byte, except for
the documented differences (docs/renderings.md), which are normalised or tested as such.
"""

from __future__ import annotations

import asyncio
import re

import pytest
import qwen_agent.tools.code_interpreter as code_interpreter
from jupyter_client import BlockingKernelClient

from kernelbox_server.sandbox.backends.local import LocalBackend
from kernelbox_server.sandbox.session import KernelSession
from kernelbox_wire.render import render_text

IMAGE_RE = re.compile(r"!\[fig-\d+\]\([^)]*\)")

CASES = {
    "stdout": "print('hello')\nprint('world')",
    "stderr": "import sys\nprint('careful', file=sys.stderr)",
    "both": "import sys\nprint('out')\nprint('err', file=sys.stderr)",
    "execute_result": "21 * 2",
    "display_text": "from IPython.display import display, HTML\ndisplay(HTML('<i>x</i>'))",
    "error": "1 / 0",
    "syntax_error": "def broken(:\n    pass",
    "name_error": "print('before')\nundefined_name",
    "image": "plt.plot([1, 2, 3])\nplt.show()",
    "image_and_result": "plt.plot([3, 2, 1])\nplt.show()\n'after the plot'",
    "empty": "y = 1",
    "dataframe": "pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})",
}


@pytest.fixture(scope="module")
async def kernels(tmp_path_factory):
    backend = LocalBackend()
    ours = await KernelSession.start(backend, tmp_path_factory.mktemp("ours") / "w")
    theirs = await KernelSession.start(backend, tmp_path_factory.mktemp("theirs") / "w")
    client = BlockingKernelClient()
    client.load_connection_info(theirs.kernel.proc.connection_info)
    client.start_channels(hb=False)
    tool = code_interpreter.CodeInterpreter.__new__(code_interpreter.CodeInterpreter)
    tool.work_dir = str(tmp_path_factory.mktemp("qwen"))
    tool.instance_id = "kernelbox-test"  # read by its __del__
    yield ours, tool, client
    client.stop_channels()
    await ours.close()
    await theirs.close()
    await backend.close()


def qwen_text(tool, client, code: str) -> str:
    """What `CodeInterpreter.call` returns, minus its in-kernel timer (we enforce deadlines
    from the host, so the timer lines are not part of the comparison)."""
    result = tool._execute_code(client, code + "\n\n")
    return result if result.strip() else "Finished execution."


def normalise(text: str) -> str:
    # Intended difference: session-wide figure numbers and our URLs.
    return IMAGE_RE.sub("![fig](IMAGE)", text)


@pytest.mark.parametrize("case", sorted(CASES))
async def test_qwen_style_matches_qwen_agent(kernels, case):
    ours, tool, client = kernels
    code = CASES[case]
    expected = await asyncio.to_thread(qwen_text, tool, client, code)
    execution = await ours.execute(code)
    assert normalise(render_text(execution)) == normalise(expected)


async def test_split_stream_is_one_block_where_qwen_agent_has_two(kernels):
    ours, tool, client = kernels
    code = "import time\nprint('first')\ntime.sleep(0.5)\nprint('second')"
    expected = await asyncio.to_thread(qwen_text, tool, client, code)
    assert expected == "stdout:\n\n```\nfirst\n\n```\n\nstdout:\n\n```\nsecond\n\n```"
    execution = await ours.execute(code)
    assert render_text(execution) == "stdout:\n\n```\nfirst\nsecond\n\n```"
