"""Native OpenAI tool calling (chat dialect): any model behind an OpenAI-compatible API.

    OPENAI_API_KEY=... MODEL=gpt-4o-mini python examples/agent_native_tools.py
    # or vLLM: vllm serve Qwen/Qwen3-8B --enable-auto-tool-choice --tool-call-parser hermes

The model gets the `code_interpreter` tool; each tool call runs in one kernelbox session and
comes back as a `role: tool` message.
"""

import asyncio
import os

from kernelbox import AsyncClient
from kernelbox.agent import Agent, AgentConfig, ModelConfig


async def main() -> None:
    model = ModelConfig(
        base_url=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        model=os.environ.get("MODEL", "gpt-4o-mini"),
    )
    async with AsyncClient() as client, await client.create_session() as session:
        agent = Agent(model, session, AgentConfig(dialect="chat"))
        result = await agent.run("Plot y = sin(x) on [0, 2π] and tell me where it is largest.")
        for step in result.steps:
            print("ran:", step.code)
            print("images:", [i.path for i in step.execution.images] if step.execution else [])
        print(result.answer)


if __name__ == "__main__":
    asyncio.run(main())
