"""Backends by name, found through the `kernelbox.backends` entry-point group.

As jupyter_client finds kernel provisioners: each backend is a `KernelBackend` subclass
declared in pyproject.toml
(`local = "kernelbox_server.sandbox.backends.local:LocalBackend"`), so another package adds
one by declaring its own entry point, and the service picks it by name. A backend builds
itself from the service's settings (`KernelBackend.from_settings`).
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .base import KernelBackend, KernelConfig

GROUP = "kernelbox.backends"


class UnknownBackend(LookupError):
    """No backend of that name is installed."""


def available() -> dict[str, EntryPoint]:
    """The installed backends, by name (nothing is imported yet)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def backend_class(name: str) -> type[KernelBackend]:
    found = available().get(name)
    if found is None:
        names = ", ".join(sorted(available())) or "none (is kernelbox installed?)"
        raise UnknownBackend(f"no backend named {name!r}; installed: {names}")
    cls = found.load()
    if not (isinstance(cls, type) and issubclass(cls, KernelBackend)):
        raise UnknownBackend(f"entry point {found.value!r} is not a KernelBackend")
    return cls


def build(name: str, config: KernelConfig, settings: Any) -> KernelBackend:
    """The backend called `name`, built from `settings` (the service's Settings)."""
    return backend_class(name).from_settings(config, settings)
