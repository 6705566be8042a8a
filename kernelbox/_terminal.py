"""What `kernelbox exec` and `kernelbox agent` share: exit codes, one-line errors, where images
are saved, and the live elapsed-time spinner (rich, when installed and on a terminal)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConnectionError, KernelboxError, RequestTimeout

OK = 0
CODE_FAILED = 1  # the code raised, or its kernel died
USAGE = 2  # bad arguments (argparse's own code)
SERVICE_UNREACHABLE = 3  # the kernelbox service cannot be reached or did not answer in time
SERVICE_ERROR = 4  # the kernelbox service refused (401, no such session, no capacity, ...)
MODEL_UNREACHABLE = 5  # the model server cannot be reached or did not answer in time
MODEL_ERROR = 6  # the model server answered an error, or something that is not a completion
TIMEOUT = 124  # the code's deadline passed (as timeout(1))
INTERRUPTED = 130  # Ctrl-C

EXIT_CODES_HELP = f"""exit status:
  {OK}    ok
  {CODE_FAILED}    the code failed (or its kernel died)
  {USAGE}    usage error
  {SERVICE_UNREACHABLE}    the kernelbox service cannot be reached (or did not answer in time)
  {SERVICE_ERROR}    the kernelbox service refused the request (API key, session, capacity)
  {MODEL_UNREACHABLE}    the model server cannot be reached (agent)
  {MODEL_ERROR}    the model server answered with an error (agent)
  {TIMEOUT}  the code's deadline passed
  {INTERRUPTED}  interrupted with Ctrl-C"""

DEFAULT_SAVE_DIR = "kernelbox-output"


def fail(command: str, exc: BaseException) -> int:
    """Say what went wrong in one line on stderr; the exit code that names the failure."""
    # Imported here: the agent package imports this module too.
    from .agent.llm import ModelError, ModelUnreachable

    if isinstance(exc, ModelUnreachable):
        code = MODEL_UNREACHABLE
    elif isinstance(exc, ModelError):
        code = MODEL_ERROR
    elif isinstance(exc, ConnectionError | RequestTimeout):
        code = SERVICE_UNREACHABLE
    elif isinstance(exc, KernelboxError):
        code = SERVICE_ERROR
    else:
        raise exc
    message = " ".join(str(exc).split())  # one line, whatever the server said
    print(f"kernelbox {command}: {message}", file=sys.stderr)
    return code


def free_name(path: Path) -> Path:
    """`path`, or `name-1.png`, `name-2.png`, ... : never overwrite an earlier run's image."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def console(file: Any = None) -> Any:
    """A rich Console on `file` (stdout by default), or None without rich."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(file=file or sys.stdout, highlight=False)


class Spinner:
    """A live `⠋ running 0:00:03` line while code runs, on a terminal only (never in a pipe or
    a file, where it would be noise). Output is written above it with `write`: the spinner
    hides for it, and comes back once output has paused (`QUIET` s) with the cursor at the
    start of a line, so a flood of output costs no redraw per line. The elapsed time runs on.
    """

    QUIET = 0.3

    def __init__(self, console: Any, label: str) -> None:
        self._progress: Any = None
        self._lock = threading.Lock()
        self._shown = False
        self._running = False
        self._last_output = 0.0
        self._at_line_start = True
        self._watcher: threading.Thread | None = None
        self._stopped = threading.Event()
        if console is None or not console.is_terminal or not sys.stdout.isatty():
            return
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn(label, style="dim"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._progress.add_task(label, total=None)

    def start(self) -> None:
        if self._progress is None:
            return
        with self._lock:
            self._running = True
            self._show()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        if self._progress is None:
            return
        with self._lock:
            self._running = False
            self._hide()
        self._stopped.set()
        if self._watcher is not None:
            self._watcher.join()

    def write(self, stream: Any, text: str) -> None:
        """Write output (the spinner out of its way)."""
        with self._lock:
            self._hide()
            stream.write(text)
            stream.flush()
            if text:
                self._at_line_start = text.endswith("\n")
            self._last_output = time.monotonic()

    @contextlib.contextmanager
    def running(self) -> Iterator[Spinner]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def _watch(self) -> None:
        while not self._stopped.wait(0.1):
            with self._lock:
                quiet = time.monotonic() - self._last_output >= self.QUIET
                if self._running and quiet and self._at_line_start:
                    self._show()

    def _show(self) -> None:
        if not self._shown:
            self._progress.start()
            self._shown = True

    def _hide(self) -> None:
        if self._shown:
            self._progress.stop()
            self._shown = False
