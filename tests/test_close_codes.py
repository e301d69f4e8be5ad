"""Close codes: used by name only, each with its meaning and reconnect advice, documented as the enum says."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from service.protocol import RECONNECT_CODES, CloseCode, Reconnect, close_label

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"
# Calls whose first argument, or `code=`, is a close code.
_CLOSING_CALLS = frozenset({"close", "close_soon", "close_label", "WebSocketError"})


def _is_close_code_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return 1000 <= node.value <= 4999
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_is_close_code_literal(element) for element in node.elts)
    return False


def _names_a_code(node: ast.AST) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return "code" in name.lower()


def bare_close_codes(source: str, filename: str = "<source>") -> list[str]:
    """Where `source` passes, compares or defaults a close code as a number instead of a CloseCode."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        suspects: list[ast.expr] = []
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in _CLOSING_CALLS and node.args:
                suspects.append(node.args[0])
            suspects += [k.value for k in node.keywords if k.arg is not None and "code" in k.arg]
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_names_a_code(o) for o in operands):
                suspects += operands
        elif isinstance(node, ast.BoolOp):
            if any(_names_a_code(v) for v in node.values):
                suspects += node.values
        elif isinstance(node, ast.arguments):
            arguments = [*node.posonlyargs, *node.args]
            pairs = list(zip(arguments[len(arguments) - len(node.defaults) :], node.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True) if d is not None]
            suspects += [default for argument, default in pairs if "code" in argument.arg]
        found += [f"{filename}:{s.lineno}" for s in suspects if _is_close_code_literal(s)]
    return found


def test_the_check_finds_bare_close_codes() -> None:
    source = """
async def f(conn, ws, code: int = 1000):
    await conn.close(1008, "x")
    conn.close_soon(4008, "y")
    await ws.close(code=1001)
    if code in (1002, 1003):
        pass
    c = int(conn.close_code or 1006)
    return code == 1009
"""
    assert len(bare_close_codes(source)) == 7
    named = "async def f(conn, code: int = CloseCode.NORMAL):\n    await conn.close(CloseCode.REBALANCE, 'x')\n"
    assert bare_close_codes(named) == []


def test_no_module_of_the_service_uses_a_close_code_as_a_bare_number() -> None:
    found = []
    for path in sorted(SERVICE.rglob("*.py")):
        found += bare_close_codes(path.read_text(), str(path.relative_to(ROOT)))
    assert found == []


@pytest.mark.parametrize("code", list(CloseCode), ids=lambda c: c.name)
def test_every_close_code_states_its_meaning_and_reconnect_advice(code: CloseCode) -> None:
    assert isinstance(code.reconnect, Reconnect)
    assert code.meaning.strip()
    assert code.advice.strip()
    assert re.fullmatch(r"[a-z_]+", code.label)


def test_reconnect_codes_are_those_that_advise_reconnecting() -> None:
    assert {code.name for code in RECONNECT_CODES} == {
        "GOING_AWAY",
        "ABNORMAL",
        "INTERNAL_ERROR",
        "SERVICE_RESTART",
        "SLOW_CONSUMER",
        "REBALANCE",
    }


def test_close_labels_name_the_services_choice_or_the_websocket_layers() -> None:
    assert close_label(CloseCode.SLOW_CONSUMER, server_initiated=True) == "slow_consumer"
    # A client may send 4008 itself: that is the client's close, not a slow consumer.
    assert close_label(CloseCode.SLOW_CONSUMER, server_initiated=False) == "client_closed"
    assert close_label(CloseCode.MESSAGE_TOO_BIG, server_initiated=False) == "message_too_big"
    assert close_label(CloseCode.INVALID_TEXT, server_initiated=False) == "protocol_error"
    assert close_label(CloseCode.ABNORMAL, server_initiated=False) == "abnormal"
    assert close_label(3999, server_initiated=False) == "client_closed"


def _protocol_md_close_codes() -> dict[int, list[str]]:
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text.split("### Close codes", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0].isdigit():
            rows[int(cells[0])] = cells[1:]
    return rows


def test_the_close_code_table_of_docs_protocol_md_is_the_enum() -> None:
    rows = _protocol_md_close_codes()
    assert sorted(rows) == sorted(int(code) for code in CloseCode)
    for code in CloseCode:
        assert rows[code] == [code.name.lower(), code.meaning, code.advice], code.name


def test_asyncapi_close_codes_advise_as_the_enum() -> None:
    codes = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())["x-close-codes"]
    as_yaml = {Reconnect.YES: True, Reconnect.NO: False, Reconnect.WITH_NEW_TOKEN: "with_new_token"}
    assert {c["code"]: (c["name"], c["reconnect"]) for c in codes} == {
        int(code): (code.name.lower(), as_yaml[code.reconnect]) for code in CloseCode
    }


def test_the_runbook_lists_every_disconnect_label() -> None:
    runbook = (ROOT / "docs" / "operations.md").read_text()
    row = next(line for line in runbook.splitlines() if line.startswith("| `eva_ws_disconnects_total` |"))
    described = row.split("|")[3]
    assert {code.label for code in CloseCode} <= set(re.findall(r"`([a-z_]+)`", described))
