"""A scripted OpenAI-compatible model server: the stand-in for a language model.

No model weights can be downloaded here, so the agent loop is tested against this server. It
answers `/v1/completions` and `/v1/chat/completions` with the next text of its script, cut at
the first `stop` string it is sent exactly as vLLM does (the stop string excluded,
`finish_reason: "stop"`, `stop_reason` naming it; `stop_reason: null` when the text ran out),
streams when asked, and records every request so tests can check the prompts byte for byte.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tests.server import serving

CHUNK = 7  # characters per streamed chunk


@dataclass
class ScriptedModel:
    # Texts for /v1/completions and text-continuing chat calls, in order.
    texts: list[str] = field(default_factory=list)
    # Assistant messages for tool-calling chat: {"content": ..., "tool_calls": [...]}.
    messages: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.requests if "prompt" in r]


def truncate(text: str, stop: list[str] | None) -> tuple[str, str | None]:
    """vLLM's rule: cut before the earliest stop string; say which one it was."""
    hits = [(text.find(s), s) for s in stop or [] if s in text]
    if not hits:
        return text, None
    at, matched = min(hits)
    return text[:at], matched


def _usage(text: str) -> dict[str, int]:
    return {"prompt_tokens": 0, "completion_tokens": max(1, len(text) // 4)}


def build_app(model: ScriptedModel) -> FastAPI:
    app = FastAPI()

    def next_text(body: dict) -> tuple[str, str | None]:
        if not model.texts:
            return "", None
        return truncate(model.texts.pop(0), body.get("stop"))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        model.requests.append(body)
        text, matched = next_text(body)
        if body.get("stream"):
            return _stream(text, matched, chat=False)
        choice = {"index": 0, "text": text, "finish_reason": "stop", "stop_reason": matched}
        return JSONResponse({"choices": [choice], "usage": _usage(text)})

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        model.requests.append(body)
        if body.get("tools") and model.messages:
            message = {"role": "assistant", "content": None, **model.messages.pop(0)}
            finish = "tool_calls" if message.get("tool_calls") else "stop"
            if body.get("stream"):
                return _stream(message["content"] or "", None, chat=True, message=message)
            choice = {"index": 0, "message": message, "finish_reason": finish}
            return JSONResponse({"choices": [choice], "usage": _usage(message["content"] or "")})
        text, matched = next_text(body)
        if body.get("stream"):
            return _stream(text, matched, chat=True)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
            "stop_reason": matched,
        }
        return JSONResponse({"choices": [choice], "usage": _usage(text)})

    return app


def _stream(
    text: str, matched: str | None, chat: bool, message: dict | None = None
) -> StreamingResponse:
    """SSE chunks as vLLM sends them; tool calls as one delta each, then the finish."""

    def piece(part: str) -> dict:
        return {"index": 0, "delta": {"content": part}} if chat else {"index": 0, "text": part}

    calls = (message or {}).get("tool_calls") or []

    def events() -> Iterator[bytes]:
        for i in range(0, len(text), CHUNK):
            chunk = {"choices": [{**piece(text[i : i + CHUNK]), "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        for n, call in enumerate(calls):
            delta = {"tool_calls": [{"index": n, **call}]}
            yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta}]})}\n\n".encode()
        finish = "tool_calls" if calls else "stop"
        last = {**piece(""), "finish_reason": finish, "stop_reason": matched}
        yield f"data: {json.dumps({'choices': [last], 'usage': _usage(text)})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@contextlib.contextmanager
def scripted_model(
    texts: list[str] | None = None, messages: list[dict[str, Any]] | None = None
) -> Iterator[ScriptedModel]:
    model = ScriptedModel(texts=list(texts or []), messages=list(messages or []))
    with serving(build_app(model)) as url:
        model.url = f"{url}/v1"
        yield model
