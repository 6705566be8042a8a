"""Renderings, byte for byte (docs/renderings.md)."""

from __future__ import annotations

import base64

from kernelbox_wire.models import ErrorInfo, Execution, Image, OutputRef, RenderOptions, Result
from kernelbox_wire.render import render_message, render_text

PNG = base64.b64encode(b"\x89PNG fake").decode()


def mixed() -> Execution:
    return Execution(
        status="error",
        stdout="hello\n",
        stderr="warn\n",
        results=[
            Result(
                type="display_data",
                data={"text/plain": "<Figure>", "image/png": PNG},
                images=["outputs/fig-003.png"],
            ),
            Result(type="execute_result", data={"text/plain": "42"}),
        ],
        error=ErrorInfo(name="ValueError", value="bad", traceback=["ValueError: bad\n"]),
        images=[
            Image(
                path="outputs/fig-003.png", url="http://h/f/outputs/fig-003.png", mime="image/png"
            )
        ],
        outputs=[
            OutputRef(type="stream", name="stdout", text="hello\n"),
            OutputRef(type="result", index=0),
            OutputRef(type="stream", name="stderr", text="\x1b[31mwarn\x1b[0m\n"),
            OutputRef(type="result", index=1),
            OutputRef(type="error"),
        ],
    )


QWEN_BODY = (
    "stdout:\n\n```\nhello\n\n```\n\n"
    "![fig-003](http://h/f/outputs/fig-003.png)\n\n"
    "stderr:\n\n```\nwarn\n\n```\n\n"
    "execute_result:\n\n```\n42\n```\n\n"
    "error:\n\n```\nValueError: bad\n\n```"
)


def test_qwen_style_interleaves_blocks_in_arrival_order():
    assert render_text(mixed()) == QWEN_BODY


def test_nothing_at_all_says_finished():
    assert render_text(Execution(status="ok")) == "Finished execution."


def test_timeout_is_the_fixed_error_block():
    ex = Execution(
        status="timeout",
        stdout="partial\n",
        error=ErrorInfo(name="TimeoutError", value="whatever"),
        outputs=[
            OutputRef(type="stream", name="stdout", text="partial\n"),
            OutputRef(type="error"),
        ],
    )
    assert render_text(ex) == (
        "stdout:\n\n```\npartial\n\n```\n\n"
        "error:\n\n```\nTimeout: Code execution exceeded the time limit.\n```"
    )
    ex.kernel_restarted = True
    assert render_text(ex).endswith(
        "Timeout: Code execution exceeded the time limit.\n"
        "The interpreter was restarted: variables, imports and definitions are lost.\n```"
    )


def test_plain_style_has_no_headers():
    assert render_text(mixed(), RenderOptions(style="plain")) == "hello\nwarn\n42\nValueError: bad"
    assert render_text(Execution(status="ok"), RenderOptions(style="plain")) == ""


def test_long_output_keeps_head_and_tail():
    text = "a" * 600 + "b" * 600
    ex = Execution(
        status="ok", stdout=text, outputs=[OutputRef(type="stream", name="stdout", text=text)]
    )
    body = render_text(ex, RenderOptions(max_chars=400))
    assert (
        body
        == "stdout:\n\n```\n" + "a" * 200 + "...[800 characters truncated]..." + "b" * 200 + "\n```"
    )


def test_envelopes_exact():
    ex = Execution(
        status="ok", stdout="1\n", outputs=[OutputRef(type="stream", name="stdout", text="1\n")]
    )
    body = "stdout:\n\n```\n1\n\n```"
    assert render_message(ex, RenderOptions(envelope="openai"), tool_call_id="call_1") == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": body,
    }
    assert render_message(ex, RenderOptions(envelope="function")) == {
        "role": "function",
        "name": "code_interpreter",
        "content": body,
    }
    assert render_text(ex, RenderOptions(envelope="tool_response")) == (
        f"<tool_response>\n{body}\n</tool_response>"
    )
    assert render_text(ex, RenderOptions(envelope="output_block")) == f"```output\n{body}\n```\n"
    assert (
        render_text(ex, RenderOptions(envelope="react")) == f"Observation: <result>{body}</result>"
    )
    assert render_text(ex, RenderOptions(envelope="qwen_fn")) == f"✿RESULT✿: {body}\n✿RETURN✿"
    plain = RenderOptions(envelope="output_block", style="plain")
    assert render_text(ex, plain) == "```output\n1\n```\n"


def test_multimodal_puts_images_as_data_urls():
    message = render_message(
        mixed(), RenderOptions(envelope="openai", multimodal=True), tool_call_id="c"
    )
    text_part, image_part = message["content"]
    assert text_part == {"type": "text", "text": QWEN_BODY}
    assert image_part == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}


def test_state_loss_between_calls_is_said_first():
    ex = Execution(status="ok", kernel_restarted=True)
    assert render_text(ex).startswith("error:\n\n```\nThe interpreter was restarted")
