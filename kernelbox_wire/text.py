"""Small text helpers shared by capture and rendering (stdlib only: the client uses them)."""

from __future__ import annotations

import re

# The pattern Qwen-Agent's code_interpreter strips tracebacks with (CSI and C1 sequences),
# so our `qwen` rendering strips exactly what it strips.
ANSI_RE = re.compile(r"(?:\x1B[@-_]|[\x80-\x9F])[0-?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    return ANSI_RE.sub("", text)


def clean_text(text: str) -> str:
    """Valid unicode for JSON: lone surrogates (from undecodable bytes) become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def collapse_cr(text: str) -> str:
    """Apply carriage returns as a terminal would, line by line (a progress bar keeps its last
    state). A trailing `\\r` is kept so that the next chunk can still overwrite the line."""
    if "\r" not in text:
        return text
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if "\r" in line:
            pending = i == len(lines) - 1 and line.endswith("\r")
            parts = [p for p in line.split("\r") if p]
            lines[i] = (parts[-1] if parts else "") + ("\r" if pending else "")
    return "\n".join(lines)


def truncation_marker(n: int) -> str:
    return f"...[{n} characters truncated]..."


def truncate_middle(text: str, max_chars: int) -> str:
    """Keep head and tail; say how much of the middle went."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]}{truncation_marker(len(text) - 2 * half)}{text[-half:]}"
