"""QwQ-32B or Qwen3 served by vLLM, thinking with a code interpreter (hermes dialect).

    vllm serve Qwen/QwQ-32B --port 8001          # or Qwen/Qwen3-8B
    make serve                                    # kernelbox on 127.0.0.1:8000
    OPENAI_BASE_URL=http://127.0.0.1:8001/v1 MODEL=Qwen/QwQ-32B python examples/agent_hermes_vllm.py

The model writes <tool_call> blocks inside its <think>; generation stops at </tool_call>, the
code runs in one kernelbox session (variables persist between calls), the output is inserted as
<tool_response>, and the same answer continues.
"""

import asyncio
import os

from kernelbox import AsyncClient
from kernelbox.agent import Agent, AgentConfig, ModelConfig, TextEvent

QUESTION = "How many primes are there below 10**6, and what is the largest one?"


async def main() -> None:
    model = ModelConfig(model=os.environ.get("MODEL", "Qwen/QwQ-32B"), temperature=0.6)
    # QwQ's chat template opens the answer with "<think>\n"; Qwen3 writes it itself.
    prefix = "<think>\n" if "QwQ" in model.model else ""
    config = AgentConfig(dialect="hermes", assistant_prefix=prefix, max_tool_calls=6)
    async with AsyncClient() as client, await client.create_session() as session:
        agent = Agent(model, session, config)
        async for event in agent.stream(QUESTION):
            if isinstance(event, TextEvent):
                print(event.text, end="", flush=True)
            elif event.kind == "output":
                print(f"\n[ran code: {event.execution.status}]")
            elif event.kind == "final":
                print(f"\n\nAnswer: {event.result.answer}")


if __name__ == "__main__":
    asyncio.run(main())
