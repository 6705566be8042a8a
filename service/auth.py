"""API keys: who is calling, and so which sessions they may see.

`Authorization: Bearer KEY` is the norm. `Basic` with the key as password is accepted too,
because SandboxFusion's client can only authenticate through a `user:KEY@host` URL.
Without configured keys every caller is the same anonymous owner.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError

ANONYMOUS = "anonymous"


def owner_of(key: str) -> str:
    """A stable, non-reversible owner id: raw keys are never stored with sessions."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def presented_key(request: Request) -> str | None:
    return key_from_header(request.headers.get("authorization", ""))


def key_from_header(header: str) -> str | None:
    """The key in an `Authorization` header (Bearer, or Basic with the key as password)."""
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return value.strip() or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


# Declares the scheme in the OpenAPI (so /docs' Authorize takes a key) on the routes that need
# a key; the key itself is read by presented_key, which takes Basic too.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="One of the service's API keys (KERNELBOX_API_KEY), as a bearer token.",
)


async def require_owner(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None,
) -> str:
    """FastAPI dependency: the caller's owner id, or 401."""
    return authenticate(request.app.state.settings.api_key, presented_key(request))


def authenticate(keys: list[str], key: str | None) -> str:
    """The owner id of `key` among the configured `keys`; ApiError 401 if it is none of them.
    Every protocol (the HTTP routes, MCP) checks keys here."""
    if not keys:
        return ANONYMOUS
    if key is None:
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'")
    for known in keys:
        if hmac.compare_digest(key.encode(), known.encode()):
            return owner_of(known)
    raise ApiError(401, "unauthorized", "invalid API key")
