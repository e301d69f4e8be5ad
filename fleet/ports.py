"""Free loopback ports for the processes the tools start."""

from __future__ import annotations

import socket
from typing import Final

# Ports a developer's machine may already serve (Redis, PostgreSQL): never handed out.
RESERVED_PORTS: Final = frozenset({6379, 5432})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's choice)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port
