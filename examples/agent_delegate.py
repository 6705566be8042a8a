"""Two models, professional division of labour (delegate dialect): a reasoning model asks for
computations in words, a coder model writes the code, kernelbox runs it.

    vllm serve Qwen/QwQ-32B --port 8001
    vllm serve Qwen/Qwen2.5-Coder-7B-Instruct --port 8002
    python examples/agent_delegate.py [--reasoner-url URL] [--coder-url URL]

Each endpoint and model comes from its flag, else the environment (REASONER_BASE_URL,
REASONER_MODEL, CODER_BASE_URL, CODER_MODEL), else the defaults above; the kernelbox service
is KERNELBOX_URL (default http://127.0.0.1:8000).
"""

import argparse
import asyncio
import os

from kernelbox import AsyncClient
from kernelbox.agent import Agent, AgentConfig, ModelConfig

QUESTION = "What is the 10,000th prime, and is it a Sophie Germain prime?"


def parse_args() -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--reasoner-url", default=env("REASONER_BASE_URL", "http://127.0.0.1:8001/v1")
    )
    parser.add_argument("--reasoner-model", default=env("REASONER_MODEL", "Qwen/QwQ-32B"))
    parser.add_argument("--coder-url", default=env("CODER_BASE_URL", "http://127.0.0.1:8002/v1"))
    parser.add_argument(
        "--coder-model", default=env("CODER_MODEL", "Qwen/Qwen2.5-Coder-7B-Instruct")
    )
    parser.add_argument("--question", default=QUESTION)
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    reasoner = ModelConfig(base_url=args.reasoner_url, model=args.reasoner_model)
    coder = ModelConfig(base_url=args.coder_url, model=args.coder_model)
    config = AgentConfig(dialect="delegate", assistant_prefix="<think>\n")
    async with AsyncClient() as client, await client.create_session() as session:
        agent = Agent(reasoner, session, config, coder=coder)
        result = await agent.run(args.question)
        for step in result.steps:
            print(f"asked: {step.request}\nwrote:\n{step.code}\n")
        print("answer:", result.answer)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
