"""`kernelbox agent "question" …`: the loop, live in the terminal (or `--json` for machines).

Thinking is dimmed, each tool call shown once as highlighted code, outputs as the model sees
them, images saved into --save-dir (named as they are saved), answers rendered as Markdown.
The pretty display uses `rich` when it is installed (`pip install './client[cli]'`) and plain
text otherwise; on a terminal, a spinner with the elapsed time shows while code runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from .. import _terminal as term
from ..errors import KernelboxError
from .dialects import DIALECTS
from .events import AgentEvent, CodeEvent, FinalEvent, OutputEvent, TextEvent, ToolErrorEvent
from .llm import DEFAULT_BASE_URL, ModelClient, ModelConfig, ModelError
from .loop import Agent, AgentConfig


def add_parser(commands: Any) -> None:
    agent = commands.add_parser(
        "agent",
        help="answer a question with a model that runs code mid-thought (think-while-doing)",
        description=__doc__,
        epilog=term.EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    agent.add_argument("question", help="the question; '-' reads it from stdin")
    agent.add_argument(
        "--base-url",
        help=f"OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else {DEFAULT_BASE_URL})",
    )
    agent.add_argument("--model", help="model name (default: $MODEL, else empty)")
    agent.add_argument(
        "--api-key", help="model server's API key (default: $OPENAI_API_KEY, else none)"
    )
    agent.add_argument(
        "--dialect",
        choices=sorted(DIALECTS),
        default="hermes",
        help="how the model asks for code (default: %(default)s; see docs/agent.md)",
    )
    agent.add_argument(
        "--mode",
        choices=["completions", "chat"],
        default="completions",
        help="continue the turn by text completion or chat continuation (default: %(default)s)",
    )
    agent.add_argument(
        "--system", help="system prompt (default: none; the dialect adds its tool section)"
    )
    agent.add_argument(
        "--assistant-prefix",
        default="",
        help="text the answer starts with, e.g. '<think>\\n' for QwQ (default: none)",
    )
    agent.add_argument(
        "--coder-base-url", help="delegate: the coder model's endpoint (default: --base-url)"
    )
    agent.add_argument("--coder-model", help="delegate: the coder model (default: --model)")
    agent.add_argument(
        "--max-tool-calls",
        type=int,
        default=AgentConfig.max_tool_calls,
        help="tool calls per answer (default: %(default)s)",
    )
    agent.add_argument(
        "--call-timeout",
        type=float,
        default=AgentConfig.call_timeout,
        help="seconds per code run (default: %(default)s)",
    )
    agent.add_argument(
        "--token-budget",
        type=int,
        default=AgentConfig.token_budget,
        help="tokens for the whole answer (default: %(default)s)",
    )
    agent.add_argument(
        "--temperature", type=float, help="sampling temperature (default: the server's)"
    )
    agent.add_argument(
        "--url", help="kernelbox service (default: $KERNELBOX_URL, else http://127.0.0.1:8000)"
    )
    agent.add_argument(
        "--kernelbox-api-key", help="kernelbox API key (default: $KERNELBOX_API_KEY, else none)"
    )
    agent.add_argument(
        "--save-dir",
        default=term.DEFAULT_SAVE_DIR,
        help="where images are saved, created when needed (default: ./%(default)s)",
    )
    agent.add_argument(
        "--notebook",
        metavar="PATH",
        help="save the code the agent ran, with its outputs, as a Jupyter notebook (default: off)",
    )
    agent.add_argument(
        "--json",
        action="store_true",
        help="print the whole result as JSON instead of the live view (default: off)",
    )
    agent.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    question = sys.stdin.read() if args.question == "-" else args.question
    try:
        return asyncio.run(_run(args, question))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return term.INTERRUPTED
    except (KernelboxError, ModelError) as exc:
        return term.fail("agent", exc)


async def _run(args: argparse.Namespace, question: str) -> int:
    from ..async_client import AsyncClient

    model = ModelClient(
        ModelConfig(
            base_url=args.base_url or "",
            model=args.model or "",
            api_key=args.api_key,
            temperature=args.temperature,
        )
    )
    coder = None
    if args.coder_base_url or args.coder_model:
        coder = ModelClient(
            ModelConfig(
                base_url=args.coder_base_url or model.config.base_url,
                model=args.coder_model or model.config.model,
                api_key=args.api_key,
            )
        )
    config = AgentConfig(
        dialect=args.dialect,
        system=args.system,
        mode=args.mode,
        assistant_prefix=args.assistant_prefix.encode().decode("unicode_escape"),
        max_tool_calls=args.max_tool_calls,
        call_timeout=args.call_timeout,
        token_budget=args.token_budget,
        stream=not args.json,
    )
    display = None if args.json else Display()
    result = None
    try:
        async with AsyncClient(args.url, args.kernelbox_api_key) as client:
            async with await client.create_session() as session:
                agent = Agent(model, session, config, coder=coder)
                async for event in agent.stream(question):
                    saved: list[Path] = []
                    if isinstance(event, OutputEvent):
                        # Saved now: the session, and its files' URLs, end with this command.
                        saved = await _save_images(session, event, Path(args.save_dir))
                        if display is None:
                            for path in saved:
                                print(f"image saved: {path}", file=sys.stderr)
                    if display is not None:
                        display.show(event, saved)
                    if isinstance(event, FinalEvent):
                        result = event.result
                if args.notebook:  # before the session ends with this command
                    saved_at = await session.save_notebook(args.notebook)
                    print(f"notebook saved: {saved_at}", file=sys.stderr)
    finally:
        if display is not None:
            display.close()
        await model.aclose()
        if coder is not None:
            await coder.aclose()
    assert result is not None
    if args.json:
        print(result.model_dump_json(indent=2))
    return term.OK


async def _save_images(session: Any, event: OutputEvent, directory: Path) -> list[Path]:
    saved = []
    for image in event.execution.images:
        directory.mkdir(parents=True, exist_ok=True)
        target = term.free_name(directory / Path(image.path).name)
        target.write_bytes(await session.download(image))
        saved.append(target)
    return saved


class Display:
    """Shows events as they come; rich when available, plain text otherwise.

    Text the model writes for a tool call is held back: when the call runs, its code is shown
    once, highlighted, instead; when it was no call after all, the text is shown as written.
    The answer (text outside thinking) is rendered as Markdown, live while it streams.
    """

    def __init__(self) -> None:
        self.console = term.console()
        self.is_tty = sys.stdout.isatty()
        self.held: list[TextEvent] = []  # text of a tool call, until the call is run or not
        self.answer = ""  # Markdown being streamed
        self.live: Any = None
        self.at_line_start = True
        self.spinner: term.Spinner | None = None

    def show(self, event: AgentEvent, saved: list[Path] | None = None) -> None:
        if isinstance(event, TextEvent) and event.call:
            self.held.append(event)
            return
        if isinstance(event, CodeEvent | ToolErrorEvent) or (
            isinstance(event, TextEvent) and event.role == "request"
        ):
            raw = "".join(e.text for e in self.held)
            self.held.clear()
            if isinstance(event, ToolErrorEvent) and raw:
                self._flush_answer()
                self._block("tool call (not run)", raw.strip("\n"), None)
        else:
            self._release_held()
        if not (isinstance(event, TextEvent) and event.role == "model" and not event.thinking):
            self._flush_answer()
        if isinstance(event, TextEvent):
            self._text(event)
        elif isinstance(event, CodeEvent):
            self._block(f"code #{event.index}", event.code, "python")
            self.spinner = term.Spinner(self.console, f"running code #{event.index}")
            self.spinner.start()
        elif isinstance(event, OutputEvent):
            self._stop_spinner()
            ex = event.execution
            text = (ex.stdout + ex.stderr).rstrip("\n")
            if ex.error is not None:
                text = (text + "\n" if text else "") + f"{ex.error.name}: {ex.error.value}"
            self._block(
                f"output #{event.index} ({ex.status}, {ex.duration_ms:.0f} ms)",
                text or "(no output)",
                None,
            )
            for path in saved or []:
                self._line(f"image saved: {path}")
        elif isinstance(event, ToolErrorEvent):
            self._line(f"tool call not run: {event.message}")
        elif isinstance(event, FinalEvent):
            r = event.result
            self._line(f"\n— {r.tool_calls} tool call(s), ~{r.tokens} tokens, {r.finish_reason}")

    def close(self) -> None:
        self._stop_spinner()
        self._release_held()
        self._flush_answer()

    # -- text --------------------------------------------------------------------------------

    def _release_held(self) -> None:
        """The held text was no call (generation went on): show it as the model wrote it."""
        held, self.held = self.held, []
        for event in held:
            self._text(event)

    def _text(self, event: TextEvent) -> None:
        if self.console is not None and event.role == "model" and not event.thinking:
            self._stream_answer(event.text)
            return
        style = "dim" if event.thinking else ("italic cyan" if event.role == "request" else "")
        if self.console is not None:
            from rich.text import Text

            self.console.print(Text(event.text, style=style), end="", soft_wrap=True)
        elif event.thinking and self.is_tty:
            print(f"\x1b[2m{event.text}\x1b[0m", end="", flush=True)
        else:
            print(event.text, end="", flush=True)
        self.at_line_start = event.text.endswith("\n")

    def _stream_answer(self, text: str) -> None:
        from rich.live import Live

        if not self.answer and not text.strip():
            return  # the blank lines after </think>: Markdown starts at the first word
        self.answer += text
        if self.live is None:
            self._newline()
            self.live = Live(
                _Tail(self.answer), console=self.console, transient=True, auto_refresh=False
            )
            self.live.start()
        self.live.update(_Tail(self.answer), refresh=True)

    def _flush_answer(self) -> None:
        """The answer so far, for good: the live preview goes, the whole Markdown stays."""
        if self.live is not None:
            self.live.stop()
            self.live = None
        if self.answer.strip():
            from rich.markdown import Markdown

            self.console.print(Markdown(self.answer.strip()))
            self.at_line_start = True
        self.answer = ""

    def _newline(self) -> None:
        if not self.at_line_start:
            if self.console is not None:
                self.console.print()
            else:
                print()
            self.at_line_start = True

    # -- blocks ------------------------------------------------------------------------------

    def _stop_spinner(self) -> None:
        if self.spinner is not None:
            self.spinner.stop()
            self.spinner = None

    def _block(self, title: str, body: str, language: str | None) -> None:
        self._newline()
        if self.console is not None:
            from rich.panel import Panel
            from rich.syntax import Syntax

            content: Any = Syntax(body, language, theme="ansi_dark") if language else body
            self.console.print(Panel(content, title=title, title_align="left", expand=False))
        else:
            print(f"--- {title} ---\n{body}\n---", flush=True)
        self.at_line_start = True

    def _line(self, text: str) -> None:
        self._newline()
        if self.console is not None:
            self.console.print(text, markup=False)
        else:
            print(text, flush=True)
        self.at_line_start = True


class _Tail:
    """The Markdown of a streaming answer, cut to its last screenful: a live display taller
    than the terminal cannot be redrawn in place."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.markdown import Markdown
        from rich.segment import Segment

        lines = console.render_lines(Markdown(self.text), options, pad=False)
        for line in lines[-max(1, console.size.height - 1) :]:
            yield from line
            yield Segment.line()
