"""`kernelbox exec CODE`: run code on a service, print its output as it streams.

stdout and stderr go to the terminal's stdout and stderr as they arrive, results and errors as
IPython would show them; images are saved into --save-dir and each path is told on stderr. On
a terminal, a spinner with the elapsed time shows while the code runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args

from kernelbox_wire.events import ErrorEvent, ResultEvent, StderrEvent, StdoutEvent
from kernelbox_wire.models import Envelope, ErrorInfo, Execution, Result, Style

from . import _terminal as term
from .client import Client, Session
from .errors import KernelboxError
from .rendering import render

FORMATS = [*get_args(Style), *get_args(Envelope), "json"]
EXIT_STATUS = {"ok": term.OK, "error": term.CODE_FAILED, "died": term.CODE_FAILED}
EXIT_STATUS["timeout"] = term.TIMEOUT
THROWAWAY_IDLE_TIMEOUT = 60.0
DEFAULT_URL = "http://127.0.0.1:8000"


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "exec",
        help="run code on a kernelbox service and print its output as it streams",
        description=__doc__,
        epilog=term.EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("code", help="the code to run, or - to read it from stdin")
    parser.add_argument(
        "--session", metavar="ID", help="run in this session (default: a new one, then deleted)"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the new session and print its id on stderr, to reuse with --session "
        "(default: off)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        metavar="FORMAT",
        help="print the model-ready rendering once done instead of streaming: "
        "qwen, plain, an envelope (openai, function, tool_response, output_block, react, "
        "qwen_fn), or json for the whole Execution (default: stream the output)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="deadline in seconds (default: the service's DEFAULT_TIMEOUT, 30 s unless configured)",
    )
    parser.add_argument("--url", help=f"the service (default: $KERNELBOX_URL, else {DEFAULT_URL})")
    parser.add_argument(
        "--api-key", help="the service's API key (default: $KERNELBOX_API_KEY, else none)"
    )
    parser.add_argument(
        "--notebook",
        metavar="PATH",
        help="save the session's history (this code and its output included) as a Jupyter "
        "notebook (default: off)",
    )
    parser.add_argument(
        "--save-dir",
        "--output-dir",
        dest="save_dir",
        default=term.DEFAULT_SAVE_DIR,
        help="where images are saved, created when needed (default: ./%(default)s)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    code = sys.stdin.read() if args.code == "-" else args.code
    with Client(args.url, args.api_key, max_retries=2) as client:
        try:
            if args.session:
                session = client.get_session(args.session)
            else:
                # Deleted at the end; should this process be killed first, it expires soon.
                idle = None if args.keep else THROWAWAY_IDLE_TIMEOUT
                session = client.create_session(idle_timeout=idle)
        except KernelboxError as exc:
            return term.fail("exec", exc)
        if args.keep and not args.session:
            print(f"session: {session.id}", file=sys.stderr)
        throwaway = not (args.session or args.keep)
        try:
            status = _run(session, code, args)
            if args.notebook:
                print(f"notebook saved: {session.save_notebook(args.notebook)}", file=sys.stderr)
            return status
        except KeyboardInterrupt:
            _quietly(session.interrupt)
            print("\ninterrupted", file=sys.stderr)
            return term.INTERRUPTED
        except KernelboxError as exc:
            return term.fail("exec", exc)
        finally:
            _quietly(session.delete if throwaway else session.close)


def _run(session: Session, code: str, args: argparse.Namespace) -> int:
    spinner = term.Spinner(term.console(), "running")
    if args.format is None:
        with spinner.running(), session.stream(code, args.timeout) as events:
            shown = _Shown(spinner)
            for event in events:
                shown.show(event)
            execution = events.until_done()
            shown.end(execution)
        _save_images(session, execution, Path(args.save_dir))
    else:
        with spinner.running():
            execution = session.execute(code, args.timeout)
        # The rendering names the images where this command put them: a throwaway
        # session's URLs are gone when it ends.
        for image, path in zip(
            execution.images,
            _save_images(session, execution, Path(args.save_dir)),
            strict=True,
        ):
            image.url = str(path)
        print(_rendering(execution, args.format))
    return EXIT_STATUS.get(execution.status, term.CODE_FAILED)


class _Shown:
    """Writes the events of a stream as they come, above the spinner."""

    def __init__(self, spinner: term.Spinner) -> None:
        self.spinner = spinner
        # The KeyboardInterrupt of a deadline is the service interrupting the code: held until
        # the end, where the timeout message says what happened instead.
        self.interrupted: ErrorInfo | None = None

    def show(self, event: Any) -> None:
        if isinstance(event, StdoutEvent):
            self._write(sys.stdout, event.text)
        elif isinstance(event, StderrEvent):
            self._write(sys.stderr, event.text)
        elif isinstance(event, ResultEvent):
            text = _result_text(event.result)
            if text is not None:
                self._write(sys.stdout, text + "\n")
        elif isinstance(event, ErrorEvent):
            if event.error.name == "KeyboardInterrupt" and self.interrupted is None:
                self.interrupted = event.error
            else:
                self._write(sys.stderr, _error_text(event.error))

    def end(self, execution: Execution) -> None:
        if self.interrupted is not None and execution.status != "timeout":
            self._write(sys.stderr, _error_text(self.interrupted))  # the code's own

    def _write(self, stream: Any, text: str) -> None:
        self.spinner.write(stream, text)


def _result_text(result: Result) -> str | None:
    """What a terminal shows of a result: its text, unless it is an image (saved to a file)."""
    if result.type == "display_data" and result.images:
        return None
    plain = result.data.get("text/plain")
    return plain if isinstance(plain, str) else None


def _error_text(error: ErrorInfo) -> str:
    text = "\n".join(error.traceback) if error.traceback else f"{error.name}: {error.value}"
    return text if text.endswith("\n") else text + "\n"


def _save_images(session: Session, execution: Execution, directory: Path) -> list[Path]:
    saved = []
    for image in execution.images:
        directory.mkdir(parents=True, exist_ok=True)
        target = term.free_name(directory / Path(image.path).name)
        target.write_bytes(session.download(image))
        print(f"image saved: {target}", file=sys.stderr)
        saved.append(target)
    return saved


def _rendering(execution: Execution, fmt: str) -> str:
    if fmt == "json":
        return execution.model_dump_json(indent=2)
    rendered = render(execution, fmt)  # type: ignore[arg-type]
    return rendered if isinstance(rendered, str) else json.dumps(rendered, indent=2)


def _quietly(action: Any) -> None:
    try:
        action()
    except Exception:
        pass  # cleaning up after the real outcome: that outcome is what to report
