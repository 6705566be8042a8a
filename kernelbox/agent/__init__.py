"""The agent loop: a reasoning model writes code mid-thought, kernelbox runs it, the output
goes back into the same answer. See `Agent` and docs/agent.md."""

from .dialects import DIALECTS, Dialect, get_dialect
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
from .llm import ModelClient, ModelConfig, ModelError, ModelUnreachable
from .loop import Agent, AgentConfig, Sandbox
from .prompts import ChatML, Plain, PromptFormat

__all__ = [
    "DIALECTS",
    "Agent",
    "AgentConfig",
    "AgentEvent",
    "AgentResult",
    "ChatML",
    "CodeEvent",
    "Dialect",
    "FinalEvent",
    "ModelClient",
    "ModelConfig",
    "ModelError",
    "ModelUnreachable",
    "OutputEvent",
    "Plain",
    "PromptFormat",
    "Sandbox",
    "Step",
    "TextEvent",
    "ToolErrorEvent",
    "get_dialect",
]
