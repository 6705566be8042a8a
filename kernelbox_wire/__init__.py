"""kernelbox's wire: what travels between the service, its clients and the models.

The schema (`models`, `events`, `sandboxfusion`), the `code_interpreter` tool (`tools`), and
the pure renderers that turn an `Execution` into model-ready text (`render`, `envelopes`).
It sits at the bottom: the engine, the service, the SDK and the agent loop import it, and it
imports none of them (only pydantic), so importing it loads no HTTP client and no engine.
"""
