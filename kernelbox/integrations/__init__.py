"""Drop-in tools for agent frameworks, each an optional extra of kernelbox-client:
`kernelbox.integrations.qwen_agent` (`pip install './client[qwen-agent]'`) and
`kernelbox.integrations.modelscope_agent` (`pip install './client[modelscope-agent]'`)."""
