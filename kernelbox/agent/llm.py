"""A small client for OpenAI-compatible model servers (vLLM, SGLang, OpenAI), over httpx.

Only what the agent loop needs: text completions (`/v1/completions`) and chat completions
(`/v1/chat/completions`), streamed or not, with the stop strings the loop sends and the reason
generation stopped. vLLM and SGLang say *which* stop string matched (`stop_reason` /
`matched_stop`); for servers that do not, the loop finds the stop string in the text.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from .._core import SSEParser

# Where a model server is looked for without OPENAI_BASE_URL: vLLM's port next to kernelbox's.
DEFAULT_BASE_URL = "http://127.0.0.1:8001/v1"


class ModelError(RuntimeError):
    """The model server answered with an error, or with something that is not a completion."""


class ModelUnreachable(ModelError):
    """The model server could not be reached, or did not answer in time."""


@dataclass
class Completion:
    text: str = ""
    finish_reason: str | None = None
    # The stop string that ended generation, when the server says (vLLM, SGLang).
    stop_reason: str | None = None
    completion_tokens: int | None = None
    # chat only
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    reasoning: str = ""


@dataclass
class ModelConfig:
    base_url: str = ""
    model: str = ""
    api_key: str | None = None
    temperature: float | None = None
    max_tokens: int = 4096
    timeout: float = 600.0
    # Extra fields sent with every request (top_p, seed, chat_template_kwargs, ...).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base_url = (
            self.base_url or os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL)
        ).rstrip("/")
        self.api_key = self.api_key or os.environ.get("OPENAI_API_KEY")
        self.model = self.model or os.environ.get("MODEL", "")


class ModelClient:
    def __init__(self, config: ModelConfig, http: httpx.AsyncClient | None = None) -> None:
        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._http = http or httpx.AsyncClient(headers=headers, timeout=config.timeout)
        self._owns_http = http is None

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    def _body(self, stop: list[str] | None, max_tokens: int | None, stream: bool) -> dict:
        body: dict[str, Any] = {
            "model": self.config.model,
            "max_tokens": max_tokens or self.config.max_tokens,
            "stream": stream,
            **self.config.extra,
        }
        if stop:
            body["stop"] = stop
        if self.config.temperature is not None:
            body["temperature"] = self.config.temperature
        return body

    async def complete(
        self,
        prompt: str,
        *,
        stop: list[str] | None = None,
        max_tokens: int | None = None,
        on_text=None,
    ) -> Completion:
        """`/v1/completions`; with `on_text`, streams and calls it with each piece of text."""
        body = {"prompt": prompt, **self._body(stop, max_tokens, stream=on_text is not None)}
        return await self._run("/completions", body, on_text, chat=False)

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        stop: list[str] | None = None,
        max_tokens: int | None = None,
        continue_final_message: bool = False,
        on_text=None,
    ) -> Completion:
        """`/v1/chat/completions`. `continue_final_message` continues the last assistant
        message instead of starting a new one (vLLM, SGLang)."""
        body = {"messages": messages, **self._body(stop, max_tokens, stream=on_text is not None)}
        if tools:
            body["tools"] = tools
        if continue_final_message:
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        return await self._run("/chat/completions", body, on_text, chat=True)

    async def _run(self, path: str, body: dict, on_text, chat: bool) -> Completion:
        url = f"{self.config.base_url}{path}"
        try:
            if not body["stream"]:
                response = await self._http.post(url, json=body)
                _raise_for(response)
                return _parse_choice(response.json(), chat)
            async with self._http.stream("POST", url, json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for(response)
                return await _collect_stream(response.aiter_lines(), chat, on_text)
        except httpx.TransportError as exc:
            raise ModelUnreachable(
                f"cannot reach the model server at {url} ({type(exc).__name__}: {exc})"
            ) from exc
        except httpx.HTTPError as exc:
            detail = f"{type(exc).__name__}: {exc}"
            raise ModelError(f"the model server at {url} failed ({detail})") from exc
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            # Not JSON, or JSON without choices: not an OpenAI-compatible server.
            raise ModelError(
                f"the model server at {url} answered something that is not a completion "
                f"({type(exc).__name__}: {exc})"
            ) from exc


def _raise_for(response: httpx.Response) -> None:
    if response.status_code >= 400:
        detail = " ".join(response.text[:300].split())  # one line, whatever the body was
        raise ModelError(
            f"the model server at {response.request.url} answered {response.status_code}: {detail}"
        )


def _parse_choice(payload: dict, chat: bool) -> Completion:
    choice = payload["choices"][0]
    usage = payload.get("usage") or {}
    out = Completion(
        finish_reason=choice.get("finish_reason"),
        stop_reason=_stop_reason(choice),
        completion_tokens=usage.get("completion_tokens"),
    )
    if chat:
        message = choice.get("message") or {}
        out.text = message.get("content") or ""
        out.reasoning = message.get("reasoning_content") or ""
        out.tool_calls = message.get("tool_calls") or []
    else:
        out.text = choice.get("text") or ""
    return out


def _stop_reason(choice: dict) -> str | None:
    reason = choice.get("stop_reason", choice.get("matched_stop"))
    return reason if isinstance(reason, str) else None


async def _collect_stream(lines: AsyncIterator[str], chat: bool, on_text) -> Completion:
    out = Completion()
    calls: dict[int, dict[str, Any]] = {}
    parser = SSEParser()
    events = 0
    async for line in lines:
        event = parser.feed(line)
        if event is None:
            continue
        events += 1
        data = event[1]
        if data.strip() == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            out.completion_tokens = chunk["usage"].get("completion_tokens")
        for choice in chunk.get("choices", []):
            if choice.get("finish_reason"):
                out.finish_reason = choice["finish_reason"]
                out.stop_reason = _stop_reason(choice) or out.stop_reason
            if chat:
                delta = choice.get("delta") or {}
                piece = delta.get("content") or ""
                out.reasoning += delta.get("reasoning_content") or ""
                for call in delta.get("tool_calls") or []:
                    slot = calls.setdefault(
                        call.get("index", 0),
                        {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                    )
                    slot["id"] = call.get("id") or slot["id"]
                    fn = call.get("function") or {}
                    slot["function"]["name"] += fn.get("name") or ""
                    slot["function"]["arguments"] += fn.get("arguments") or ""
            else:
                piece = choice.get("text") or ""
            if piece:
                out.text += piece
                if on_text is not None:
                    maybe = on_text(piece)
                    if hasattr(maybe, "__await__"):
                        await maybe
    if not events:
        raise ValueError("no server-sent event in its answer")
    out.tool_calls = [calls[i] for i in sorted(calls)]
    return out
