"""Two models, professional division of labour (delegate dialect): a reasoning model asks for
computations in words, a coder model writes the code, kernelbox runs it.

    vllm serve Qwen/QwQ-32B --port 8001
    vllm serve Qwen/Qwen2.5-Coder-7B-Instruct --port 8002
    python examples/agent_delegate.py
"""

import asyncio

from kernelbox import AsyncClient
from kernelbox.agent import Agent, AgentConfig, ModelConfig


async def main() -> None:
    reasoner = ModelConfig(base_url="http://127.0.0.1:8001/v1", model="Qwen/QwQ-32B")
    coder = ModelConfig(base_url="http://127.0.0.1:8002/v1", model="Qwen/Qwen2.5-Coder-7B-Instruct")
    config = AgentConfig(dialect="delegate", assistant_prefix="<think>\n")
    async with AsyncClient() as client, await client.create_session() as session:
        agent = Agent(reasoner, session, config, coder=coder)
        result = await agent.run("What is the 10,000th prime, and is it a Sophie Germain prime?")
        for step in result.steps:
            print(f"asked: {step.request}\nwrote:\n{step.code}\n")
        print("answer:", result.answer)


if __name__ == "__main__":
    asyncio.run(main())
