"""Prompt formats for text completion: how system + question become the model's prompt."""

from __future__ import annotations

from typing import Any


class PromptFormat:
    """Renders the conversation up to where the assistant's text begins."""

    def render(self, system: str, question: str) -> str:
        raise NotImplementedError

    def messages(self, system: str, question: str) -> list[dict[str, Any]]:
        out = [{"role": "system", "content": system}] if system else []
        return [*out, {"role": "user", "content": question}]


class ChatML(PromptFormat):
    """The Qwen family's template (Qwen2.5, QwQ, Qwen3): <|im_start|>role\\n…<|im_end|>."""

    def render(self, system: str, question: str) -> str:
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{head}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


class Plain(PromptFormat):
    """For base models (ToRL-style RL): system text, the question, nothing else."""

    def render(self, system: str, question: str) -> str:
        return f"{system}\n{question}\n" if system else f"{question}\n"
