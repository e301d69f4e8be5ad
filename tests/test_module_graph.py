"""Modules import downwards only: backends -> broker, presence, caps -> Redis plumbing; ws_endpoint -> messages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parent.parent / "service"

# Module (or package) -> what it must never import, at the top or inside a function.
FORBIDDEN = {
    "service.broker": ("service.backends", "service.presence", "service.presence_redis", "service.limits"),
    "service.presence": ("service.broker", "service.backends"),
    "service.presence_redis": ("service.broker", "service.backends"),
    "service.limits_redis": ("service.broker", "service.backends", "service.presence"),
    "service.backend_errors": ("service",),
    "service.redis_keys": ("service",),
    "service.redis_lua": ("service",),
    "service.redis_client": ("service",),
    # A connection's life: ws_endpoint -> session -> hub -> messages -> protocol; connection and
    # websocket below session, never the other way.
    "service.protocol": (
        "service.messages",
        "service.session",
        "service.hub",
        "service.connection",
        "service.ws_endpoint",
    ),
    "service.messages": (
        "service.session",
        "service.hub",
        "service.snapshots",
        "service.connection",
        "service.ws_endpoint",
    ),
    "service.websocket": ("service.connection", "service.session", "service.hub", "service.ws_endpoint"),
    "service.connection": ("service.session", "service.hub", "service.ws_endpoint"),
    "service.session": ("service.ws_endpoint", "service.handlers"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("owner", sorted(FORBIDDEN))
def test_no_import_runs_back_up_the_module_graph(owner: str) -> None:
    files = [p for p in SERVICE.rglob("*.py") if under(module_name(p), owner)]
    assert files, f"no module {owner}"
    wrong = []
    for path in files:
        for name in imported_modules(path):
            for forbidden in FORBIDDEN[owner]:
                # `service` alone forbids every service module except the owner's own package.
                if under(name, forbidden) and not under(name, owner) and name != "service.__future__":
                    wrong.append(f"{module_name(path)} imports {name}")
    assert wrong == []
