"""The error every shared backend (broker, presence, connection caps) raises when its store cannot answer now."""

from __future__ import annotations


class BackendUnavailable(Exception):
    """The backend cannot take this call now (e.g. Redis is down); the caller may retry later."""
