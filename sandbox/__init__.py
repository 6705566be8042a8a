"""The engine: kernels, sessions, the warm pool, the fork server (docs/architecture.md).

Imported as `kernelbox_server.sandbox`, never by the folder's bare name: two names for one
module would give two copies of each class (an error raised under one name would not be
caught under the other)."""

if __name__ != "kernelbox_server.sandbox":
    raise ImportError(f"import kernelbox_server.sandbox, not {__name__!r}")
