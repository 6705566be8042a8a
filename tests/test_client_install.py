"""A client-only install: `pip install ./client` into a fresh venv installs only the client and
the wire package, pulls only httpx and pydantic, and works against a real service.

Slow (a venv, a wheel build, a download of httpx and pydantic); skipped when PyPI cannot be
reached.
"""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest

from tests.server import running_server
from tests.support import ROOT, fresh_venv, pypi_reachable

HEAVY = ["jupyter_client", "zmq", "fastapi", "uvicorn", "psutil", "docker", "ipykernel", "numpy"]

CLIENT_SCRIPT = textwrap.dedent(
    """
    import asyncio
    import importlib.util
    import sys

    import kernelbox
    from kernelbox import AsyncClient, Client, CODE_INTERPRETER_TOOL, render

    HEAVY = sys.argv[1].split(",")
    installed = [name for name in HEAVY if importlib.util.find_spec(name) is not None]
    assert not installed, f"installed with the client alone: {installed}"
    ENGINE = ("kernelbox_server", "sandbox", "service")
    engine = [m for m in sys.modules if m.split(".")[0] in ENGINE]
    assert not engine, engine  # the client and the wire load nothing of the engine

    with Client() as client, client.create_session() as session:
        execution = session.execute("x = 6 * 7\\nprint(x)")
        assert execution.stdout == "42\\n", execution
        events = [e.type for e in session.stream("print(x + 1)")]
        assert events == ["stdout", "end"], events
        assert render(execution, "plain") == "42"
        session.upload(b"data", "f.txt")
        assert session.download("f.txt") == b"data"
        call = {"id": "c1", "function": {"name": "code_interpreter", "arguments": '{"code": "x"}'}}
        message = session.run_tool_call(call)
        assert message["content"] == "execute_result:\\n\\n```\\n42\\n```", message
        assert client.tools() == [CODE_INTERPRETER_TOOL]

    async def main():
        async with AsyncClient() as client:
            async with await client.create_session() as session:
                return (await session.execute("1 + 1")).results[0].data["text/plain"]

    assert asyncio.run(main()) == "2"
    loaded = [name for name in HEAVY if name in sys.modules]
    assert not loaded, loaded
    print("client-only install works", kernelbox.__version__)
    """
)


@pytest.mark.timeout(600)
def test_client_only_install_works_against_the_service(tmp_path):
    if not pypi_reachable():
        pytest.skip("PyPI is not reachable: cannot install into a fresh venv")
    python = fresh_venv(tmp_path, [str(ROOT / "client")], timeout=540)
    venv = python.parent.parent

    frozen = subprocess.run(
        [str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout.lower()
    names = {line.split("==")[0].replace("_", "-") for line in frozen.split()}
    assert {"kernelbox-client", "httpx", "pydantic"} <= names
    assert not names & {"fastapi", "uvicorn", "jupyter-client", "pyzmq", "psutil", "numpy"}
    assert not names & {"kernelbox", "kernelbox-server"}
    # Only the client and the wire package of ours, and nothing by a generic name.
    site = next((venv / "lib").glob("python3*/site-packages"))
    ours = sorted(
        p.name for p in site.iterdir() if p.name.startswith(("kernelbox", "sandbox", "service"))
    )
    assert [n for n in ours if not n.endswith(".dist-info")] == ["kernelbox", "kernelbox_wire"]

    with running_server(min_idle=2) as server:
        env = {**os.environ, "KERNELBOX_URL": server.url}
        env.pop("KERNELBOX_API_KEY", None)
        env.pop("PYTHONPATH", None)
        script = tmp_path / "client_check.py"
        script.write_text(CLIENT_SCRIPT)
        checked = subprocess.run(
            [str(python), str(script), ",".join(HEAVY)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,  # not the repository: only the installed package can be imported
            timeout=120,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "client-only install works" in checked.stdout

        kernelbox = str(venv / "bin" / "kernelbox")
        run = subprocess.run(
            [kernelbox, "exec", "print('from the installed command')"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout == "from the installed command\n"

    serve = subprocess.run(
        [kernelbox, "serve"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    assert serve.returncode == 2 and "pip install ./client ." in serve.stderr
