"""Every message the server sends a client is built in service/messages.py, nowhere else."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"
# Dicts with a "type" that are not server messages, and why.
NOT_SERVER_MESSAGES = {
    "service/publisher.py": "the event a publisher puts on the broker (the hub builds the message from it)",
    "service/control_api.py": "an unsubscribe command checked with the client message parser",
}


def dicts_with_a_type(source: str) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "type" for k in node.keys)
    ]


def test_the_check_finds_a_message_built_as_a_dict() -> None:
    assert dicts_with_a_type('reply = encode({"type": "pong", "timestamp": now})\n') == [1]


def test_server_messages_are_built_only_in_service_messages() -> None:
    found = []
    for path in sorted(SERVICE.rglob("*.py")):
        name = str(path.relative_to(ROOT))
        if name != "service/messages.py" and name not in NOT_SERVER_MESSAGES:
            found += [f"{name}:{line}" for line in dicts_with_a_type(path.read_text())]
    assert found == []
