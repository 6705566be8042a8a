"""The OpenAI SDK calls a model with the `code_interpreter` tool; kernelbox runs its tool calls.

    kernelbox serve &
    OPENAI_BASE_URL=http://localhost:8001/v1 OPENAI_API_KEY=... MODEL=Qwen/Qwen3-8B \
        python examples/openai_tools.py "What is the 30th Fibonacci number?"

Any OpenAI-compatible endpoint with tool calling works (OpenAI; vLLM with
`--enable-auto-tool-choice --tool-call-parser hermes`; SGLang). Every call of one conversation
runs in the same session, so the model's variables persist from call to call.
"""

import os
import sys

from openai import OpenAI

from kernelbox import CODE_INTERPRETER_TOOL, Client

MODEL = os.environ.get("MODEL", "gpt-4o-mini")
QUESTION = sys.argv[1] if len(sys.argv) > 1 else "What is the sum of the first 100 primes?"
MAX_ROUNDS = 8

llm = OpenAI()  # OPENAI_BASE_URL, OPENAI_API_KEY
messages = [{"role": "user", "content": QUESTION}]

with Client() as sandbox:  # the session for tool calls is made on the first one, deleted at exit
    for _ in range(MAX_ROUNDS):
        reply = llm.chat.completions.create(
            model=MODEL, messages=messages, tools=[CODE_INTERPRETER_TOOL]
        )
        message = reply.choices[0].message
        messages.append(message)
        if not message.tool_calls:
            print(message.content)
            break
        for call in message.tool_calls:
            print(f"--- the model runs:\n{call.function.arguments}", file=sys.stderr)
            result = sandbox.run_tool_call(call)  # {"role": "tool", "tool_call_id": ..., ...}
            print(f"--- output:\n{result['content']}", file=sys.stderr)
            messages.append(result)
