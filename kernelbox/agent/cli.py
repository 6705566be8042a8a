"""`kernelbox agent "question" …`: the loop, live in the terminal (or `--json` for machines).

Thinking is dimmed, code highlighted, outputs shown as the model sees them, saved images named.
The pretty display uses `rich` when it is installed (`pip install 'kernelbox[cli]'`) and plain
text otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from .dialects import DIALECTS
from .events import AgentEvent, CodeEvent, FinalEvent, OutputEvent, TextEvent, ToolErrorEvent
from .llm import ModelConfig
from .loop import Agent, AgentConfig


def add_parser(commands: Any) -> None:
    agent = commands.add_parser(
        "agent",
        help="answer a question with a model that runs code mid-thought (think-while-doing)",
        description=__doc__,
    )
    agent.add_argument("question", help="the question; '-' reads it from stdin")
    agent.add_argument("--base-url", help="OpenAI-compatible endpoint (env OPENAI_BASE_URL)")
    agent.add_argument("--model", help="model name (env MODEL)")
    agent.add_argument("--api-key", help="model API key (env OPENAI_API_KEY)")
    agent.add_argument("--dialect", choices=sorted(DIALECTS), default="hermes")
    agent.add_argument(
        "--mode",
        choices=["completions", "chat"],
        default="completions",
        help="continue the turn by text completion or chat continuation",
    )
    agent.add_argument("--system", help="system prompt (the dialect adds its tool section)")
    agent.add_argument(
        "--assistant-prefix",
        default="",
        help="text the answer starts with, e.g. '<think>\\n' for QwQ",
    )
    agent.add_argument("--coder-base-url", help="delegate: the coder model's endpoint")
    agent.add_argument("--coder-model", help="delegate: the coder model")
    agent.add_argument("--max-tool-calls", type=int, default=AgentConfig.max_tool_calls)
    agent.add_argument(
        "--call-timeout", type=float, default=AgentConfig.call_timeout, help="seconds per code run"
    )
    agent.add_argument("--token-budget", type=int, default=AgentConfig.token_budget)
    agent.add_argument("--temperature", type=float)
    agent.add_argument("--url", help="kernelbox service URL (env KERNELBOX_URL)")
    agent.add_argument("--kernelbox-api-key", help="kernelbox API key (env KERNELBOX_API_KEY)")
    agent.add_argument("--json", action="store_true", help="print the whole result as JSON")
    agent.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    question = sys.stdin.read() if args.question == "-" else args.question
    return asyncio.run(_run(args, question))


async def _run(args: argparse.Namespace, question: str) -> int:
    from ..async_client import AsyncClient

    model = ModelConfig(
        base_url=args.base_url or "",
        model=args.model or "",
        api_key=args.api_key,
        temperature=args.temperature,
    )
    coder = None
    if args.coder_base_url or args.coder_model:
        coder = ModelConfig(
            base_url=args.coder_base_url or model.base_url,
            model=args.coder_model or model.model,
            api_key=args.api_key,
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
    async with AsyncClient(args.url, args.kernelbox_api_key) as client:
        async with await client.create_session() as session:
            agent = Agent(model, session, config, coder=coder)
            display = None if args.json else Display()
            result = None
            async for event in agent.stream(question):
                if display is not None:
                    display.show(event)
                if isinstance(event, FinalEvent):
                    result = event.result
    assert result is not None
    if args.json:
        print(result.model_dump_json(indent=2))
    return 0


class Display:
    """Shows events as they come; rich when available."""

    def __init__(self) -> None:
        try:
            from rich.console import Console
        except ImportError:
            self.console = None
        else:
            self.console = Console(highlight=False)

    def show(self, event: AgentEvent) -> None:
        if isinstance(event, TextEvent):
            self._text(event)
        elif isinstance(event, CodeEvent):
            self._block(f"code #{event.index}", event.code, "python")
        elif isinstance(event, OutputEvent):
            ex = event.execution
            text = (ex.stdout + ex.stderr).rstrip("\n")
            if ex.error is not None:
                text = (text + "\n" if text else "") + f"{ex.error.name}: {ex.error.value}"
            self._block(
                f"output #{event.index} ({ex.status}, {ex.duration_ms:.0f} ms)",
                text or "(no output)",
                None,
            )
            for image in ex.images:
                self._line(f"image saved: {image.path}  {image.url}")
        elif isinstance(event, ToolErrorEvent):
            self._line(f"tool call not run: {event.message}")
        elif isinstance(event, FinalEvent):
            r = event.result
            self._line(f"\n— {r.tool_calls} tool call(s), ~{r.tokens} tokens, {r.finish_reason}")

    def _text(self, event: TextEvent) -> None:
        style = "dim" if event.thinking else ("italic cyan" if event.role == "request" else "")
        if self.console is not None:
            self.console.print(event.text, style=style or None, end="", markup=False)
        else:
            print(
                f"\x1b[2m{event.text}\x1b[0m" if event.thinking else event.text, end="", flush=True
            )

    def _block(self, title: str, body: str, language: str | None) -> None:
        if self.console is not None:
            from rich.panel import Panel
            from rich.syntax import Syntax

            content: Any = Syntax(body, language, theme="ansi_dark") if language else body
            self.console.print()
            self.console.print(Panel(content, title=title, title_align="left", expand=False))
        else:
            print(f"\n--- {title} ---\n{body}\n---", flush=True)

    def _line(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, markup=False)
        else:
            print(text, flush=True)
