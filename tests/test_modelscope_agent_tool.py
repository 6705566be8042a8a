"""kernelbox as ModelScope-Agent's `code_interpreter` (kernelbox.integrations.modelscope_agent),
end to end: the real modelscope-agent package's RolePlay agent, a scripted OpenAI-compatible
model and a real service. Variables persist across the tool calls of one conversation; a plot
comes back as ModelScope's `![IMAGEGEN](path)` with the file saved in the tool's work_dir.

modelscope-agent pulls about 160 packages (spaCy, transformers, llama-index) and pins some
below this project's own, so it is installed with the client extra into a venv of its own,
as a user would (`pip install './client[modelscope-agent]'`). Slow (about a minute with a warm
cache); skipped when PyPI cannot be reached.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import httpx
import pytest

from tests.scripted_llm import scripted_model
from tests.server import running_server
from tests.support import ROOT, fresh_venv, pypi_reachable

KEY = "modelscope-key"

AGENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import kernelbox.integrations.modelscope_agent as kb
    from modelscope_agent.agents.role_play import RolePlay

    base_url, api_key, model_url, work_dir = sys.argv[1:5]
    llm = {"model": "scripted", "model_server": "openai", "api_base": model_url,
           "api_key": "none", "is_function_call": False}
    tool_cfg = {"code_interpreter": {"base_url": base_url, "api_key": api_key,
                                      "work_dir": work_dir, "timeout": 60}}
    bot = RolePlay(function_list=[tool_cfg], llm=llm, instruction="You run code.")
    tool = bot.function_map["code_interpreter"]
    assert isinstance(tool, kb.KernelboxCodeInterpreter), type(tool)
    text = "".join(bot.run("What is 6 * 7?"))
    session_id = tool.session.id
    direct = [tool.call(json.dumps({"code": code}), timeout=2) for code in sys.argv[5:]]
    tool.close()
    print(json.dumps({"text": text, "session_id": session_id, "direct": direct}))
    """
)


def action(code: str) -> str:
    # ModelScope's ReAct format: the arguments as JSON on the Action Input line.
    arguments = json.dumps({"code": code})
    return f"Thought: run it\nAction: code_interpreter\nAction Input: {arguments}\n"


@pytest.fixture(scope="module")
def modelscope_python(tmp_path_factory) -> Path:
    if not pypi_reachable():
        pytest.skip("PyPI is not reachable: cannot install modelscope-agent into a fresh venv")
    where = tmp_path_factory.mktemp("modelscope")
    return fresh_venv(where, [f"{ROOT / 'client'}[modelscope-agent]"])


@pytest.mark.timeout(1200)
def test_role_play_keeps_variables_across_calls_and_gets_images(modelscope_python, tmp_path):
    script = [
        action("x = 6 * 7"),
        action("import matplotlib.pyplot as plt\nplt.plot([1, 4, 9]); plt.show()\nprint(x)"),
        "The answer is 42.",
    ]
    work_dir = tmp_path / "ci"
    with running_server(min_idle=1, api_key=[KEY]) as service, scripted_model(script) as model:
        direct_calls = ["1 / 0", "pass", "import time\ntime.sleep(30)"]
        args = [service.url, KEY, model.url, work_dir, *direct_calls]
        run = subprocess.run(
            [str(modelscope_python), "-c", AGENT_SCRIPT, *args],
            cwd=tmp_path,  # modelscope-agent downloads nltk data into ./tmp
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        answer = json.loads(run.stdout.strip().splitlines()[-1])
        text, sid = answer["text"], answer["session_id"]
        # The first call's answer, then the plot and x from the second, in ModelScope's text.
        image = work_dir / f"{sid}-fig-001.png"
        assert "Observation: <result>The code executed successfully.</result>" in text
        assert f"Observation: <result>![IMAGEGEN]({image})\n42\n</result>" in text
        assert image.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert text.endswith("The answer is 42.")
        # The model was prompted with the tool's answer.
        assert "The code executed successfully." in json.dumps(model.requests[1])
        error, nothing, slow = answer["direct"]
        assert "ZeroDivisionError" in error and "\x1b[" not in error
        assert nothing == "The code executed successfully."
        # close() deleted the session.
        gone = httpx.get(
            f"{service.url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY}"}
        )
        assert gone.status_code == 404
    assert slow == "Timeout: Code execution exceeded the time limit."
