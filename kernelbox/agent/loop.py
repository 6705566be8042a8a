"""The think-while-doing loop: the model writes code in the middle of its reasoning,
generation stops, the code runs, its output is inserted, generation continues.

Text dialects continue one assistant turn, either by text completion of a prompt the loop
renders (ChatML by default) or by chat completion that continues the final assistant message
(`continue_final_message`, vLLM and SGLang). The `chat` dialect uses native tool calls and
`role: tool` messages instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from kernelbox_wire.models import ErrorInfo, Execution, OutputRef, RenderOptions
from kernelbox_wire.render import render_body
from kernelbox_wire.tools import CODE_INTERPRETER_TOOL, InvalidArguments, extract_code

from .dialects import Call, Delegate, Dialect, Malformed, get_dialect, last_python_block
from .events import (
    AgentEvent,
    AgentResult,
    CodeEvent,
    FinalEvent,
    OutputEvent,
    Step,
    TextEvent,
    ToolErrorEvent,
)
from .llm import Completion, ModelClient, ModelConfig
from .prompts import ChatML, PromptFormat


class Sandbox(Protocol):
    """Where the code runs: a kernelbox session (`AsyncSession`) or anything alike."""

    async def execute(self, code: str, timeout: float | None = None) -> Execution: ...


@dataclass
class AgentConfig:
    dialect: str = "hermes"
    system: str | None = None
    # "completions": the loop renders the prompt (ChatML) and uses /v1/completions;
    # "chat": /v1/chat/completions continuing the final assistant message.
    mode: Literal["completions", "chat"] = "completions"
    # Text the assistant turn starts with, e.g. "<think>\n" for QwQ (its template adds it).
    assistant_prefix: str = ""
    max_tool_calls: int = 8
    call_timeout: float = 30.0
    token_budget: int = 32_768
    max_tokens_per_call: int = 4096
    # The body inserted for a result: None takes the dialect's own (qwen, plain for tir).
    style: Literal["qwen", "plain"] | None = None
    max_output_chars: int = 4000
    stream: bool = True


@dataclass
class _Turn:
    """The state of one answer while it is being produced."""

    question: str
    prompt_head: str = ""  # completions mode: the rendered prompt before the assistant text
    assistant: str = ""  # the assistant text so far, insertions included
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat dialect
    steps: list[Step] = field(default_factory=list)
    tokens: int = 0
    calls: int = 0
    # Where the text after the last insertion starts: the final answer is there.
    answer_from: int = 0


class Agent:
    def __init__(
        self,
        model: ModelClient | ModelConfig,
        sandbox: Sandbox,
        config: AgentConfig | None = None,
        *,
        coder: ModelClient | ModelConfig | None = None,
        prompt_format: PromptFormat | None = None,
    ) -> None:
        self.model = model if isinstance(model, ModelClient) else ModelClient(model)
        self.sandbox = sandbox
        self.config = config or AgentConfig()
        self.dialect: Dialect = get_dialect(self.config.dialect)
        if coder is None:
            self.coder = self.model
        else:
            self.coder = coder if isinstance(coder, ModelClient) else ModelClient(coder)
        self.prompt_format = prompt_format or ChatML()
        self.render = RenderOptions(
            style=self.config.style or self.dialect.style,  # type: ignore[arg-type]
            max_chars=self.config.max_output_chars,
        )

    async def run(self, question: str) -> AgentResult:
        """Answer `question`; the result holds the whole transcript."""
        result = None
        async for event in self.stream(question):
            if isinstance(event, FinalEvent):
                result = event.result
        assert result is not None
        return result

    async def stream(self, question: str) -> AsyncIterator[AgentEvent]:
        """Typed events while the loop runs; the last one is a FinalEvent."""
        queue: asyncio.Queue[AgentEvent | None] = asyncio.Queue()

        async def produce() -> None:
            try:
                await self._answer(question, queue.put_nowait)
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(produce())
        try:
            while (event := await queue.get()) is not None:
                yield event
            await task  # re-raises what the loop raised
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- the loop -------------------------------------------------------------------------

    async def _answer(self, question: str, emit: Callable[[AgentEvent], None]) -> None:
        turn = _Turn(question)
        system = self.dialect.system_prompt(self.config.system)
        if self.dialect.native_tools:
            await self._chat_loop(turn, system, emit)
            return
        turn.assistant = self.config.assistant_prefix
        turn.prompt_head = self.prompt_format.render(system, question)
        finish = "stop"
        while True:
            stop = list(self.dialect.stop) if turn.calls < self.config.max_tool_calls else []
            completion = await self._generate(turn, stop, emit)
            text, stopped_at = _cut_at_stop(completion, stop)
            turn.assistant += text
            turn.tokens += completion.completion_tokens or _estimate_tokens(text)
            parsed = self.dialect.parse(text, stopped_at) if stop else None
            if parsed is None:
                finish = completion.finish_reason or "stop"
                break
            insertion = await self._act(turn, parsed, text, stopped_at, emit)
            turn.assistant += insertion
            turn.answer_from = len(turn.assistant)
            if turn.tokens >= self.config.token_budget:
                finish = "token_budget"
                break
        answer = self.dialect.answer(turn.assistant[turn.answer_from :])
        emit(FinalEvent(result=self._result(turn, answer, turn.assistant, finish)))

    async def _generate(
        self, turn: _Turn, stop: list[str], emit: Callable[[AgentEvent], None]
    ) -> Completion:
        splitter = _TextSplitter(turn.assistant, self.dialect.call_start)

        def on_text(piece: str) -> None:
            for event in splitter.feed(piece):
                emit(event)

        max_tokens = min(
            self.config.max_tokens_per_call, max(self.config.token_budget - turn.tokens, 1)
        )
        callback = on_text if self.config.stream else None
        if self.config.mode == "chat":
            messages = self.prompt_format.messages(
                self.dialect.system_prompt(self.config.system), turn.question
            )
            messages.append({"role": "assistant", "content": turn.assistant})
            completion = await self.model.chat(
                messages,
                stop=stop,
                max_tokens=max_tokens,
                continue_final_message=True,
                on_text=callback,
            )
        else:
            completion = await self.model.complete(
                turn.prompt_head + turn.assistant,
                stop=stop,
                max_tokens=max_tokens,
                on_text=callback,
            )
        if not self.config.stream:
            on_text(completion.text)
        for event in splitter.flush():
            emit(event)
        return completion

    async def _act(
        self,
        turn: _Turn,
        parsed: Call | Malformed,
        segment: str,
        stopped_at: str | None,
        emit: Callable[[AgentEvent], None],
    ) -> str:
        """Run what the model asked for; return the text to insert."""
        turn.calls += 1
        if isinstance(parsed, Malformed):
            emit(ToolErrorEvent(message=parsed.message))
            execution = _error_execution("InvalidToolCall", parsed.message)
            body = render_body(execution, self.render)
            turn.steps.append(Step(error=parsed.message, execution=execution))
            return self.dialect.insertion(segment, stopped_at, body)
        code = parsed.code
        if isinstance(self.dialect, Delegate):
            code = await self._write_code(parsed.request, emit)
        execution = await self._execute(code, turn, emit)
        body = render_body(execution, self.render)
        if isinstance(self.dialect, Delegate):
            body = Delegate.delegated_body(code, body)
        turn.steps.append(Step(code=code, request=parsed.request or None, execution=execution))
        if turn.calls >= self.config.max_tool_calls:
            body += (
                f"\n\nTool call limit reached ({self.config.max_tool_calls}): no more code will "
                "run. Give your final answer now."
            )
        return self.dialect.insertion(segment, stopped_at, body)

    async def _execute(self, code: str, turn: _Turn, emit) -> Execution:
        emit(CodeEvent(code=code, index=turn.calls))
        execution = await self.sandbox.execute(code, timeout=self.config.call_timeout)
        emit(OutputEvent(execution=execution, index=turn.calls))
        return execution

    async def _write_code(self, request: str, emit: Callable[[AgentEvent], None]) -> str:
        """delegate: the coder model turns the request into a program."""
        emit(TextEvent(text=request, thinking=False, role="request"))
        reply = await self.coder.chat(Delegate.coder_messages(request))
        code = last_python_block(reply.text + "\n")
        return code if code is not None else reply.text.strip().strip("`")

    async def _chat_loop(self, turn: _Turn, system: str, emit) -> None:
        turn.messages = self.prompt_format.messages(system, turn.question)
        finish = "stop"
        while True:
            tools = [CODE_INTERPRETER_TOOL] if turn.calls < self.config.max_tool_calls else None
            # Native tool calls arrive apart from the text: only thinking is told apart.
            splitter = _TextSplitter("", ())

            def on_text(piece: str, splitter: _TextSplitter = splitter) -> None:
                for event in splitter.feed(piece):
                    emit(event)

            completion = await self.model.chat(
                turn.messages,
                tools=tools,
                max_tokens=self.config.max_tokens_per_call,
                on_text=on_text if self.config.stream else None,
            )
            if not self.config.stream:
                on_text(completion.text)
            for event in splitter.flush():
                emit(event)
            turn.tokens += completion.completion_tokens or _estimate_tokens(completion.text)
            message: dict[str, Any] = {"role": "assistant", "content": completion.text or None}
            if completion.tool_calls:
                message["tool_calls"] = completion.tool_calls
            turn.messages.append(message)
            if not completion.tool_calls:
                finish = completion.finish_reason or "stop"
                break
            for call in completion.tool_calls:
                turn.calls += 1
                try:
                    code = extract_code(call["function"].get("arguments"))
                    if call["function"].get("name") != CODE_INTERPRETER_TOOL["function"]["name"]:
                        raise InvalidArguments(f"unknown tool {call['function'].get('name')!r}")
                except InvalidArguments as exc:
                    emit(ToolErrorEvent(message=str(exc)))
                    execution = _error_execution("InvalidToolCall", str(exc))
                    turn.steps.append(Step(error=str(exc), execution=execution))
                else:
                    execution = await self._execute(code, turn, emit)
                    turn.steps.append(Step(code=code, execution=execution))
                turn.messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": call.get("id", ""),
                        "content": render_body(execution, self.render),
                    }
                )
            if turn.tokens >= self.config.token_budget:
                finish = "token_budget"
                break
        answer = turn.messages[-1].get("content") or ""
        emit(FinalEvent(result=self._result(turn, self.dialect.answer(answer), answer, finish)))

    def _result(self, turn: _Turn, answer: str, transcript: str, finish: str) -> AgentResult:
        return AgentResult(
            question=turn.question,
            answer=answer,
            transcript=transcript,
            prompt=turn.prompt_head,
            messages=turn.messages,
            steps=turn.steps,
            tool_calls=turn.calls,
            tokens=turn.tokens,
            finish_reason=finish,
        )


# -- helpers ----------------------------------------------------------------------------------


def _cut_at_stop(completion: Completion, stop: list[str]) -> tuple[str, str | None]:
    """The text up to where generation stopped, and the stop string that stopped it.

    vLLM and SGLang name the matched stop string; otherwise, a server that ignored `stop`
    may return text past it, so the text is cut at the first stop string it contains.
    """
    text = completion.text
    if completion.stop_reason in stop:
        return text, completion.stop_reason
    hits = [(text.find(s), s) for s in stop if s in text]
    if hits:
        at, matched = min(hits)
        return text[:at], matched
    return text, None


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4) if text else 0


def _error_execution(name: str, message: str) -> Execution:
    return Execution(
        status="error", error=ErrorInfo(name=name, value=message), outputs=[OutputRef(type="error")]
    )


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class _TextSplitter:
    """Splits streamed text where its kind changes: into `<think>…</think>` (tags included)
    and out, and into a tool call from its opening marker on. Markers can arrive split across
    chunks: a chunk's tail that may begin one is held back until the next chunk (or `flush`),
    so no marker is ever cut between two kinds."""

    def __init__(self, before: str, call_start: tuple[str, ...]) -> None:
        self.thinking = before.rfind(THINK_OPEN) > before.rfind(THINK_CLOSE)
        self.call = False  # generation stops at a call's end: once in one, in it until then
        self.call_start = call_start
        self.pending = ""

    def feed(self, piece: str) -> list[TextEvent]:
        text, out = self.pending + piece, []
        while True:
            markers = self._markers()
            hits = [(text.find(m), m) for m in markers if m in text]
            if not hits:
                break
            at, marker = min(hits)
            self._add(out, text[:at])
            if marker == THINK_OPEN:
                self.thinking = True
            elif marker != THINK_CLOSE:
                self.call = True
            self._add(out, marker)
            if marker == THINK_CLOSE:
                self.thinking = False
            text = text[at + len(marker) :]
        held = max(
            (n for m in self._markers() for n in range(1, len(m)) if text.endswith(m[:n])),
            default=0,
        )
        self._add(out, text[: len(text) - held])
        self.pending = text[len(text) - held :]
        return out

    def flush(self) -> list[TextEvent]:
        out: list[TextEvent] = []
        self._add(out, self.pending)
        self.pending = ""
        return out

    def _markers(self) -> tuple[str, ...]:
        return (THINK_OPEN, THINK_CLOSE) + (() if self.call else self.call_start)

    def _add(self, out: list[TextEvent], text: str) -> None:
        if text:
            out.append(TextEvent(text=text, thinking=self.thinking, call=self.call))
