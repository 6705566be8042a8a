"""Model-ready text from an `Execution`: body styles and envelopes (docs/renderings.md).

Pure functions over the wire model (no kernel, no HTTP), so the client SDK renders locally
with exactly the same code the service uses.

Style `qwen` is byte-compatible with Qwen-Agent's code_interpreter tool, with these intended
differences (docs/renderings.md): consecutive chunks of one stream are one block; ANSI escapes
are stripped from every block, not only tracebacks; images are numbered across the session
(`fig-007`), not per call, and JPEG/SVG count as images too; empty code gives
`Finished execution.` rather than an empty string; a restart after a deadline or a crash
says that state was lost.
"""

from __future__ import annotations

import base64
from typing import Any

from .envelopes import wrap
from .models import Execution, RenderOptions
from .text import strip_ansi, truncate_middle

NOTHING_TEXT = "Finished execution."
TIMEOUT_LINE = "Timeout: Code execution exceeded the time limit."
STATE_LOST_LINE = "The interpreter was restarted: variables, imports and definitions are lost."
RESUMED_LINE = "The session was resumed after a pause; these variables could not be restored:"
TOOL_NAME = "code_interpreter"


def _block(kind: str, text: str, max_chars: int) -> str:
    return f"{kind}:\n\n```\n{truncate_middle(strip_ansi(text), max_chars)}\n```"


def _error_text(execution: Execution) -> str:
    if execution.status == "timeout":
        text = TIMEOUT_LINE
    elif execution.error is None:
        return ""
    elif execution.error.traceback:
        text = "\n".join(execution.error.traceback)
    else:
        text = f"{execution.error.name}: {execution.error.value}"
    if execution.kernel_restarted and execution.status == "timeout":
        text += "\n" + STATE_LOST_LINE
    return text


def _not_restored_text(execution: Execution) -> str:
    """What a resumed session lost, for the model (nothing when everything came back)."""
    if not (execution.resumed and execution.not_restored):
        return ""
    lines = [f"{name}: {why}" for name, why in sorted(execution.not_restored.items())]
    return "\n".join([RESUMED_LINE, *lines])


def _image_markdown(execution: Execution, path: str) -> str:
    url = next((img.url for img in execution.images if img.path == path), path)
    stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return f"![{stem}]({url})"


def render_qwen(execution: Execution, max_chars: int = 20_000) -> str:
    parts: list[str] = []
    for out in execution.outputs:
        if out.type == "stream" and out.text:
            parts.append(_block(out.name or "stdout", out.text, max_chars))
        elif out.type == "result" and out.index is not None:
            result = execution.results[out.index]
            plain = result.data.get("text/plain", "")
            image = result.images[0] if result.images else None
            if result.type == "execute_result" or image is None:
                if isinstance(plain, str) and plain:
                    parts.append(_block(result.type, plain, max_chars))
            if image is not None:
                parts.append(_image_markdown(execution, image))
        elif out.type == "error":
            text = _error_text(execution)
            if text:
                parts.append(_block("error", text, max_chars))
    if execution.kernel_restarted and execution.status in ("ok", "error"):
        # The kernel had died between calls: the model must not rely on earlier state.
        parts.insert(0, _block("error", STATE_LOST_LINE, max_chars))
    lost = _not_restored_text(execution)
    if lost:
        parts.insert(0, _block("error", lost, max_chars))
    body = "\n\n".join(parts)
    return body if body.strip() else NOTHING_TEXT


def render_plain(execution: Execution, max_chars: int = 20_000) -> str:
    """stdout, stderr, the last result's text, the error's last line; no headers."""
    parts = [_not_restored_text(execution), execution.stdout, execution.stderr]
    for result in reversed(execution.results):
        plain = result.data.get("text/plain")
        if result.type == "execute_result" and isinstance(plain, str):
            parts.append(plain)
            break
    error = _error_text(execution)
    if error:
        lines = [line for line in error.splitlines() if line.strip()]
        parts.append(lines[-1] if lines and execution.status != "timeout" else error)
    text = "\n".join(strip_ansi(p).rstrip("\n") for p in parts if p and p.strip())
    return truncate_middle(text, max_chars)


def render_body(execution: Execution, options: RenderOptions | None = None) -> str:
    options = options or RenderOptions()
    if options.style == "plain":
        return render_plain(execution, options.max_chars)
    return render_qwen(execution, options.max_chars)


def render_text(execution: Execution, options: RenderOptions | None = None) -> str:
    """The body in its text envelope (`openai`/`function` give the bare body)."""
    options = options or RenderOptions()
    return wrap(render_body(execution, options), options.envelope)


def image_parts(execution: Execution, read_image) -> list[dict[str, Any]]:
    """OpenAI `image_url` content parts (data URLs); `read_image(path) -> bytes`."""
    parts = []
    for img in execution.images:
        if img.mime not in ("image/png", "image/jpeg"):
            continue
        b64 = base64.b64encode(read_image(img.path)).decode()
        parts.append({"type": "image_url", "image_url": {"url": f"data:{img.mime};base64,{b64}"}})
    return parts


def render_message(
    execution: Execution,
    options: RenderOptions | None = None,
    *,
    tool_call_id: str | None = None,
    read_image=None,
) -> dict[str, Any] | str:
    """The whole tool message: a chat message dict for `openai`/`function`, else text.

    With `multimodal`, images become `image_url` parts after the text (data URLs, read with
    `read_image`, or taken from the results' base64 when no reader is given).
    """
    options = options or RenderOptions()
    body = render_body(execution, options)
    if options.envelope not in ("openai", "function"):
        return wrap(body, options.envelope)
    content: str | list[dict[str, Any]] = body
    if options.multimodal:
        reader = read_image or (lambda path: _image_bytes_from_results(execution, path))
        images = image_parts(execution, reader)
        if images:
            content = [{"type": "text", "text": body}, *images]
    if options.envelope == "function":
        return {"role": "function", "name": TOOL_NAME, "content": content}
    return {"role": "tool", "tool_call_id": tool_call_id or "", "content": content}


def image_base64(execution: Execution, path: str, mime: str) -> str | None:
    """The saved image at `path`, base64-encoded, from the result that displayed it (its
    data holds base64 for PNG and JPEG, the text itself for SVG)."""
    for result in execution.results:
        value = result.data.get(mime)
        if path in result.images and isinstance(value, str):
            return base64.b64encode(value.encode()).decode() if mime == "image/svg+xml" else value
    return None


def _image_bytes_from_results(execution: Execution, path: str) -> bytes:
    mime = next(img.mime for img in execution.images if img.path == path)
    encoded = image_base64(execution, path, mime)
    if encoded is None:
        raise FileNotFoundError(path)
    return base64.b64decode(encoded)
