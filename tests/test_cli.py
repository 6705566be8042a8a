"""`kernelbox exec`, run as a real process against a real service on loopback."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kernelbox as kb
from tests.server import free_port, running_server

PLOT = "plt.plot([1, 2, 3]); plt.show()"


@pytest.fixture(scope="module")
def server():
    with running_server(min_idle=2, max_sessions=16) as srv:
        yield srv


def kernelbox_exec(server, *args: str, stdin: str | None = None, cwd=None):
    env = {**os.environ, "KERNELBOX_URL": server.url}
    env.pop("KERNELBOX_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "kernelbox.cli", "exec", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def sessions_left(server) -> list[str]:
    with kb.Client(server.url) as client:
        return [s.id for s in client.list_sessions()]


def test_prints_stdout_stderr_and_results(server, tmp_path):
    code = "import sys\nprint('hi')\nprint('warn', file=sys.stderr)\n6 * 7"
    done = kernelbox_exec(server, code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hi\n42\n"
    assert done.stderr == "warn\n"
    assert sessions_left(server) == [], "the throwaway session was not deleted"


def test_exit_status_for_an_error_and_a_timeout(server):
    failed = kernelbox_exec(server, "print('before')\n1/0")
    assert failed.returncode == 1
    assert failed.stdout == "before\n"
    assert "ZeroDivisionError: division by zero" in failed.stderr
    timed_out = kernelbox_exec(server, "while True: pass", "--timeout", "1")
    assert timed_out.returncode == 124
    assert "Code execution exceeded the time limit" in timed_out.stderr


def test_a_timeout_says_only_that_the_deadline_passed(server):
    # The service interrupts the code at the deadline: the kernel's KeyboardInterrupt is its
    # doing, not the code's, and is not shown; a KeyboardInterrupt the code raises itself is.
    timed_out = kernelbox_exec(server, "while True: pass", "--timeout", "1")
    assert timed_out.returncode == 124
    assert timed_out.stderr == "TimeoutError: Code execution exceeded the time limit. (1 s)\n"
    raised = kernelbox_exec(server, "raise KeyboardInterrupt")
    assert raised.returncode == 1 and "KeyboardInterrupt" in raised.stderr


def test_code_from_stdin(server):
    done = kernelbox_exec(server, "-", stdin="x = 2\nprint(x * 21)\n")
    assert done.returncode == 0 and done.stdout == "42\n"


def test_keep_then_reuse_a_session(server):
    kept = kernelbox_exec(server, "--keep", "v = 7")
    assert kept.returncode == 0
    assert kept.stderr.startswith("session: ")
    sid = kept.stderr.split()[1]
    try:
        reused = kernelbox_exec(server, "--session", sid, "print(v * 6)")
        assert reused.returncode == 0 and reused.stdout == "42\n"
        assert sid in sessions_left(server), "a session given with --session was deleted"
    finally:
        with kb.Client(server.url) as client:
            client.delete_session(sid)
    gone = kernelbox_exec(server, "--session", sid, "1")
    assert gone.returncode == 4
    assert "no session" in gone.stderr and gone.stdout == ""


def test_images_are_written_to_files(server, tmp_path):
    out = tmp_path / "images"
    first = kernelbox_exec(server, "--save-dir", str(out), "print('plotted')\n" + PLOT)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "plotted\n"
    image = out / "fig-001.png"
    assert image.read_bytes().startswith(b"\x89PNG")
    assert first.stderr == f"image saved: {image}\n"
    again = kernelbox_exec(server, "--output-dir", str(out), PLOT)  # the older name
    assert f"image saved: {out / 'fig-001-1.png'}" in again.stderr  # never overwrites
    # By default, into a folder of the current directory, named relative to it.
    in_cwd = kernelbox_exec(server, PLOT, cwd=tmp_path)
    assert (tmp_path / "kernelbox-output" / "fig-001.png").exists()
    assert in_cwd.stderr == "image saved: kernelbox-output/fig-001.png\n"


def test_output_streams_before_the_code_ends(server):
    env = {**os.environ, "KERNELBOX_URL": server.url}
    code = "import time\nprint('early', flush=True)\ntime.sleep(2)\nprint('late')"
    started = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-m", "kernelbox.cli", "exec", code],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        first_at = time.monotonic() - started
        rest = proc.stdout.read()
    assert first == "early\n" and rest == "late\n"
    assert proc.returncode == 0
    # The whole run takes at least 2 s; the first line came well before that.
    assert time.monotonic() - started >= 2
    assert first_at < time.monotonic() - started - 1.0


def test_format_prints_the_rendering(server, tmp_path):
    plain = kernelbox_exec(server, "--format", "plain", "print(1)\n2")
    assert plain.returncode == 0 and plain.stdout == "1\n2\n"
    qwen = kernelbox_exec(server, "--format", "tool_response", "print(1)")
    assert qwen.stdout == "<tool_response>\nstdout:\n\n```\n1\n\n```\n</tool_response>\n"
    openai = json.loads(kernelbox_exec(server, "--format", "openai", "1").stdout)
    assert openai == {
        "role": "tool",
        "tool_call_id": "",
        "content": "execute_result:\n\n```\n1\n```",
    }
    whole = json.loads(kernelbox_exec(server, "--format", "json", "print('j')").stdout)
    assert whole["status"] == "ok" and whole["stdout"] == "j\n"
    # Images are saved, and the rendering points at the saved file.
    drawn = kernelbox_exec(server, "--format", "qwen", "--save-dir", str(tmp_path), PLOT)
    assert f"![fig-001]({tmp_path / 'fig-001.png'})" in drawn.stdout
    failed = kernelbox_exec(server, "--format", "plain", "1/0")
    assert failed.returncode == 1 and failed.stdout == "ZeroDivisionError: division by zero\n"


def test_service_errors_are_one_line_with_their_own_exit_codes(server):
    url = f"http://127.0.0.1:{free_port()}"
    done = kernelbox_exec(server, "--url", url, "1")
    assert done.returncode == 3
    assert f"cannot connect to the kernelbox service at {url}" in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("kernelbox exec: ")
    with running_server(min_idle=0, api_key=["secret"]) as keyed:
        denied = kernelbox_exec(keyed, "1")
        assert denied.returncode == 4 and "401" in denied.stderr
        assert denied.stderr.count("\n") == 1
        allowed = kernelbox_exec(keyed, "--api-key", "secret", "print('in')")
        assert allowed.returncode == 0 and allowed.stdout == "in\n"


def test_usage_errors_exit_2(server):
    assert kernelbox_exec(server).returncode == 2  # no code
    assert kernelbox_exec(server, "--format", "nope", "1").returncode == 2


@pytest.mark.parametrize("backend", ["local", "docker"])
def test_make_serve_honours_kernelbox_backend(backend):
    # A dry run (-n) of the recipe, the venv taken as built (-o): the command it would start.
    env = {**os.environ, "KERNELBOX_BACKEND": backend}
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", "serve"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"kernelbox serve --backend {backend}\n" in done.stdout
    # ... and says where the command is, which is not on PATH.
    assert "the kernelbox command is .venv/bin/kernelbox" in done.stdout


def test_help_shows_every_default():
    from kernelbox.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert "default" in (action.help or ""), (name, action.option_strings)
    shown = subprocess.run(
        [sys.executable, "-m", "kernelbox.cli", "agent", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())  # argparse wraps lines
    assert "else http://127.0.0.1:8001/v1" in text  # the model server
    assert "else http://127.0.0.1:8000" in text  # the kernelbox service
    assert "default: ./kernelbox-output" in text
    assert "5 the model server cannot be reached" in text  # the exit codes


def test_exec_saves_the_session_as_a_notebook(server, tmp_path):
    import nbformat

    ran = kernelbox_exec(server, "--notebook", "out.ipynb", "print(1 + 1)", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.strip() == "notebook saved: out.ipynb"
    notebook = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert [c.source for c in notebook.cells] == ["print(1 + 1)"]
    assert notebook.cells[0].outputs[0].text == "2\n"
