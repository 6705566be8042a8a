"""Tool-integrated reasoning as Qwen2.5-Math and ToRL do it (tir dialect).

    vllm serve Qwen/Qwen2.5-Math-7B-Instruct --port 8001
    export OPENAI_BASE_URL=http://127.0.0.1:8001/v1 MODEL=Qwen/Qwen2.5-Math-7B-Instruct
    python examples/agent_tir.py

The model writes ```python blocks; generation stops at ```output, kernelbox runs the block and
inserts ```output\\n…\\n```\\n (plain style: raw output, as in the RL prompts), and it goes on.
"""

import asyncio

from kernelbox import AsyncClient
from kernelbox.agent import Agent, AgentConfig, ModelConfig


async def main() -> None:
    async with AsyncClient() as client, await client.create_session() as session:
        agent = Agent(ModelConfig(temperature=0.0), session, AgentConfig(dialect="tir"))
        result = await agent.run("Find the sum of all positive divisors of 2024.")
        print(result.transcript)
        print("answer:", result.answer)


if __name__ == "__main__":
    asyncio.run(main())
