"""The service: the FastAPI app, its protocols and the application layer under them
(docs/architecture.md).

Imported as `kernelbox_server.service`, never by the folder's bare name (see sandbox)."""

if __name__ != "kernelbox_server.service":
    raise ImportError(f"import kernelbox_server.service, not {__name__!r}")
