"""The live display of `kernelbox agent` and `kernelbox exec` on a real terminal: each command
runs in a tmux pane (a real pty, rendered by a real terminal emulator) against a real service
and a scripted model, and the test reads the screen tmux shows, escapes included."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scripted_llm import scripted_model
from tests.server import running_server

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

DIM = "\x1b[2m"
SGR = re.compile(r"\x1b\[[0-9;]*m")


class Pane:
    """One command in a detached tmux session of its own (own socket: no other tmux seen)."""

    def __init__(self, socket: Path, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.socket = socket
        # The pane stays after the command, to be read; its exit status is printed last.
        script = f'{shlex.join(command)}; echo "[exit $?]"; sleep 600'
        flags = [arg for name, value in env.items() for arg in ("-e", f"{name}={value}")]
        self._tmux("new-session", "-d", "-x", "110", "-y", "50", "-c", str(cwd), *flags, script)

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def screen(self, escapes: bool = False) -> str:
        """What the terminal shows, scrollback included; with SGR escapes if asked."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-500", *(["-e"] * escapes))

    def wait_for(self, pattern: str, timeout: float = 90) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.screen())
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} never on screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(
            ["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, timeout=30
        )


@pytest.fixture(scope="module")
def service():
    with running_server(min_idle=1) as srv:
        yield srv


@pytest.fixture
def pane(service, tmp_path) -> Iterator:
    panes: list[Pane] = []

    def start(*args: str, **env: str) -> Pane:
        env = {"KERNELBOX_URL": service.url, "TERM": "xterm-256color", **env}
        command = [sys.executable, "-m", "kernelbox.cli", *args]
        panes.append(Pane(tmp_path / "tmux.sock", command, tmp_path, env))
        return panes[-1]

    yield start
    for p in panes:
        p.close()


def hermes_call(code: str) -> str:
    args = json.dumps({"name": "code_interpreter", "arguments": {"code": code}})
    return f"<tool_call>\n{args}\n</tool_call>"


CODE = "import time\ntime.sleep(3)\nplt.plot([1, 4, 9]); plt.show()\nprint(6 * 7)"


def test_agent_live_display(pane, tmp_path):
    first = "<think>\nLet me plot it and compute.\n" + hermes_call(CODE)
    second = "The plot is drawn.\n</think>\n\n## Result\n\nThe answer is **42**, see `fig`.\n"
    with scripted_model([first, second]) as model:
        shown = pane("agent", "What is 6 * 7?", "--base-url", model.url, "--model", "m")
        # While the code runs (3 s): a spinner with the elapsed time.
        spinner = shown.wait_for(r"running code #1\s+0:00:0\d|\[exit \d+\]")
        shown.wait_for(r"\[exit \d+\]")
    screen = shown.screen()
    assert "[exit 0]" in screen, screen
    # The call once, as highlighted code: no raw <tool_call> JSON before it.
    assert "<tool_call>" not in screen and '"code_interpreter"' not in screen, screen
    assert screen.count("print(6 * 7)") == 1, screen
    assert "code #1" in screen and "output #1" in screen and "42" in screen
    # Thinking dimmed, both tags whole and dim: no style change inside either.
    styled = shown.screen(escapes=True)
    for tag in ("<think>", "</think>"):
        at = styled.find(tag)
        assert at >= 0, f"{tag} not shown whole (a style change inside it):\n{styled!r}"
        last_style = SGR.findall(styled[:at])[-1]
        assert last_style == DIM or DIM in styled[at - 20 : at], (tag, styled[at - 40 : at])
    assert "Let me plot it and compute." in screen
    # The answer rendered as Markdown, not printed raw.
    assert "The answer is 42, see fig." in screen, screen
    assert "**" not in screen and "## Result" not in screen
    # The plot saved next to the user, and its path told; the spinner gone.
    assert "image saved: kernelbox-output/fig-001.png" in screen
    assert (tmp_path / "kernelbox-output" / "fig-001.png").read_bytes().startswith(b"\x89PNG")
    assert "running code" not in screen
    assert spinner.group().startswith("running code"), "no spinner while the code ran"


def test_exec_spinner_and_clean_screen(pane, tmp_path):
    shown = pane("exec", "import time\nprint('early', flush=True)\ntime.sleep(3)\nprint('late')")
    shown.wait_for(r"early\n.*running\s+0:00:0\d")
    shown.wait_for(r"\[exit \d+\]")
    screen = shown.screen()
    assert re.search(r"early\nlate\n\[exit 0\]", screen), screen
    assert "running" not in screen  # the spinner leaves nothing behind


def test_exec_timeout_on_a_terminal(pane):
    shown = pane("exec", "--timeout", "1", "while True: pass")
    shown.wait_for(r"\[exit \d+\]")
    screen = shown.screen()
    assert "[exit 124]" in screen and "KeyboardInterrupt" not in screen, screen
    assert "TimeoutError: Code execution exceeded the time limit. (1 s)" in screen
