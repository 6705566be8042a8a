"""Fixtures of the hostile suite (see harness.py)."""

from tests.hostile.harness import hostile, service

__all__ = ["hostile", "service"]
