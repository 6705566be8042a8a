"""Engine errors: each one names what went wrong in words a caller can act on."""


class SandboxError(Exception):
    """Base class of the engine's errors."""


class KernelStartError(SandboxError):
    """A kernel could not be started or did not become ready (the backend is at fault)."""


class SessionBusy(SandboxError):
    """The session is running other code; one execution at a time per session."""


class SessionClosed(SandboxError):
    """The session was closed; its kernel and files are gone."""


class SessionNotFound(SandboxError):
    """No session with that id (or not one the caller may see)."""


class PoolExhausted(SandboxError):
    """Every session slot is taken; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PauseFailed(SandboxError):
    """The session's variables could not be saved; it keeps running, nothing is lost."""


class SessionLost(SandboxError):
    """The machine that ran the session is gone, and its kernel and files with it (a cluster:
    see the Ray mode); only deleting the session is left to do."""
