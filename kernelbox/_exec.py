"""`kernelbox exec CODE`: run code on a service, print its output as it streams.

stdout and stderr go to the terminal's stdout and stderr as they arrive, results and errors as
IPython would show them; images are written to files and each path is told on stderr. Exit
status: 0 ok, 1 the code failed (or its kernel died), 2 usage or service error, 124 the
deadline passed, 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args

from kernelbox_wire.events import ErrorEvent, ResultEvent, StderrEvent, StdoutEvent
from kernelbox_wire.models import Envelope, ErrorInfo, Execution, Result, Style

from .client import Client, Session
from .errors import KernelboxError
from .rendering import render

FORMATS = [*get_args(Style), *get_args(Envelope), "json"]
EXIT_STATUS = {"ok": 0, "error": 1, "died": 1, "timeout": 124}
SERVICE_ERROR = 2
THROWAWAY_IDLE_TIMEOUT = 60.0


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "exec",
        help="run code on a kernelbox service and print its output as it streams",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("code", help="the code to run, or - to read it from stdin")
    parser.add_argument(
        "--session", metavar="ID", help="run in this session (default: a new one, then deleted)"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the new session and print its id on stderr, to reuse with --session",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        metavar="FORMAT",
        help="print the model-ready rendering once done instead of streaming: "
        "qwen, plain, an envelope (openai, function, tool_response, output_block, react, "
        "qwen_fn), or json for the whole Execution",
    )
    parser.add_argument("--timeout", type=float, help="deadline in seconds (default: service's)")
    parser.add_argument(
        "--url", help="the service (default: $KERNELBOX_URL, else http://127.0.0.1:8000)"
    )
    parser.add_argument("--api-key", help="API key (default: $KERNELBOX_API_KEY)")
    parser.add_argument(
        "--output-dir", default=".", help="where images are written (default: the current one)"
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
            return _fail(exc)
        if args.keep and not args.session:
            print(f"session: {session.id}", file=sys.stderr)
        throwaway = not (args.session or args.keep)
        try:
            return _run(session, code, args)
        except KeyboardInterrupt:
            _quietly(session.interrupt)
            print("\ninterrupted", file=sys.stderr)
            return 130
        except KernelboxError as exc:
            return _fail(exc)
        finally:
            _quietly(session.delete if throwaway else session.close)


def _run(session: Session, code: str, args: argparse.Namespace) -> int:
    if args.format is None:
        with session.stream(code, args.timeout) as events:
            for event in events:
                _show(event)
            execution = events.until_done()
        _save_images(session, execution, Path(args.output_dir))
    else:
        execution = session.execute(code, args.timeout)
        # The rendering names the images where this command put them: a throwaway
        # session's URLs are gone when it ends.
        for image, path in zip(
            execution.images,
            _save_images(session, execution, Path(args.output_dir)),
            strict=True,
        ):
            image.url = str(path)
        print(_rendering(execution, args.format))
    return EXIT_STATUS.get(execution.status, 1)


def _show(event: Any) -> None:
    if isinstance(event, StdoutEvent):
        _write(sys.stdout, event.text)
    elif isinstance(event, StderrEvent):
        _write(sys.stderr, event.text)
    elif isinstance(event, ResultEvent):
        text = _result_text(event.result)
        if text is not None:
            _write(sys.stdout, text + "\n")
    elif isinstance(event, ErrorEvent):
        _write(sys.stderr, _error_text(event.error))


def _write(stream: Any, text: str) -> None:
    stream.write(text)
    stream.flush()


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
        target = _free_name(directory / Path(image.path).name)
        target.write_bytes(session.download(image))
        print(f"image written to {target}", file=sys.stderr)
        saved.append(target)
    return saved


def _free_name(path: Path) -> Path:
    """`path`, or `name-1.png`, `name-2.png`, ... : never overwrite an earlier run's image."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _rendering(execution: Execution, fmt: str) -> str:
    if fmt == "json":
        return execution.model_dump_json(indent=2)
    rendered = render(execution, fmt)  # type: ignore[arg-type]
    return rendered if isinstance(rendered, str) else json.dumps(rendered, indent=2)


def _fail(exc: BaseException) -> int:
    print(f"kernelbox exec: {exc}", file=sys.stderr)
    return SERVICE_ERROR


def _quietly(action: Any) -> None:
    try:
        action()
    except Exception:
        pass  # cleaning up after the real outcome: that outcome is what to report
