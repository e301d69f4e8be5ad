"""docs/schemas and docs/asyncapi.yaml describe the protocol the service really speaks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from jsonschema import Draft7Validator

from service.app import create_app
from service.broker.memory import MemoryBroker
from service.protocol import RECONNECT_CODES, Channel, CloseCode, ErrorCode, EventType
from tests.conftest import (
    connect,
    make_settings,
    publish,
    receive_json,
    subscribe,
    token_for,
    txn,
)
from tests.protocol_schemas import CLIENT_TYPES, SCHEMA_DIR, SERVER_TYPES, assert_client_message, validator

ASYNCAPI = SCHEMA_DIR.parent / "asyncapi.yaml"
ROOT = SCHEMA_DIR.parent.parent


def common() -> dict[str, Any]:
    result: dict[str, Any] = json.loads((SCHEMA_DIR / "common.json").read_text())["definitions"]
    return result


def test_every_message_has_a_valid_schema() -> None:
    for name in sorted(CLIENT_TYPES | SERVER_TYPES | {"event"}):
        schema = validator(name).schema  # checked against the draft-07 meta-schema on load
        assert isinstance(schema, dict)
        assert schema["title"].startswith(name)


def test_schema_enums_match_the_service() -> None:
    assert set(json.loads((SCHEMA_DIR / "error.json").read_text())["properties"]["code"]["enum"]) == {
        code.value for code in ErrorCode
    }
    assert set(json.loads((SCHEMA_DIR / "event.json").read_text())["properties"]["type"]["enum"]) == {
        kind.value for kind in EventType
    }
    assert set(common()["channel"]["enum"]) == {channel.value for channel in Channel}


@pytest.mark.parametrize(
    "message",
    [
        {"type": "subscribe"},
        {"type": "subscribe", "channel": "transactions", "colour": "red"},
        {"type": "subscribe", "channel": "transactions", "filters": {"customerId": "C*"}},
        {"type": "subscribe", "channel": "transactions", "since": {"offset": -1, "epoch": "e"}},
        {"type": "subscribe", "channel": "transactions", "snapshot": "yes"},
        {"type": "ping", "correlationId": ""},
        {"type": "refresh"},
        {"type": "unsubscribe", "channel": "secrets"},
    ],
)
def test_schemas_refuse_what_the_server_refuses(message: dict[str, Any]) -> None:
    with pytest.raises(AssertionError, match="does not match"):
        assert_client_message(message)


async def send(ws: aiohttp.ClientWebSocketResponse, message: dict[str, Any]) -> None:
    assert_client_message(message)
    await ws.send_json(message)


async def test_every_message_type_of_a_real_connection_matches_its_schema(aiohttp_client: Any) -> None:
    """Drive each client and server message through the app; conftest.receive_json validates each reply."""
    settings = make_settings(token_refresh_grace_s="30")
    broker = MemoryBroker(history_size=1)
    client = await aiohttp_client(create_app(settings, broker=broker))
    seen: set[str] = set()

    async def next_message(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
        message = await receive_json(ws)
        seen.add("event" if message["type"] in {e.value for e in EventType} else message["type"])
        return message

    ws = await connect(client, token_for(settings, sub="alice", customers=["C1"]))
    ack = await subscribe(ws, filters={"customerId": "C1"}, correlationId="s1", timestamp="2030-01-01T00:00:00Z")
    seen.add(ack["type"])
    await send(ws, {"type": "subscribe", "channel": "notifications", "correlationId": "s2"})
    await next_message(ws)
    for kind in ("transaction_new", "transaction_update", "stage_change", "transaction_delete"):
        await publish(client, settings, {"type": kind, "data": txn(updatedBy="alice", changedFields=["status"])})
        assert (await next_message(ws))["type"] == kind
    await publish(
        client, settings, {"type": "notification", "channel": "notifications", "userId": "alice", "data": {"n": 1}}
    )
    assert (await next_message(ws))["type"] == "notification"

    # A subscribe with a snapshot gets the current state right after its ack (another customer:
    # the offsets of C1 stay as the resumes below expect).
    await publish(client, settings, {"type": "transaction_new", "data": txn("T2", customer="C2")})
    viewer = await connect(client, token_for(settings, sub="viewer", customers=["C2"]))
    assert (await subscribe(viewer, filters={"customerId": "C2"}, snapshot=True))["snapshot"] is True
    state = await next_message(viewer)
    assert ([t["id"] for t in state["data"]["transactions"]], state["data"]["last"]) == (["T2"], True)

    # A subscription with presence sees another socket of its customer open and close.
    watcher = await connect(client, token_for(settings, sub="watcher", customers=["C1"]))
    assert (await subscribe(watcher, filters={"customerId": "C1"}, presence=True))["presence"] is True
    visitor = await connect(client, token_for(settings, sub="visitor", customers=["C1"]))
    assert (await next_message(watcher))["type"] == "presence_join"
    await visitor.close()
    assert (await next_message(watcher))["type"] == "presence_leave"

    await send(ws, {"type": "ping", "correlationId": "p1"})
    assert (await next_message(ws))["type"] == "pong"
    await send(ws, {"type": "ping"})
    assert (await next_message(ws))["correlationId"] is None
    await ws.send_str('{"type": "dance"}')
    assert (await next_message(ws))["code"] == "unknown_type"

    # This token expires within a second of being minted: the server asks for a refresh.
    short = await connect(client, token_for(settings, sub="alice", customers=["C1"], ttl_s=1))
    assert (await next_message(short))["code"] == "token_expiring"
    fresh = token_for(settings, sub="alice", customers=["C1"])
    await send(short, {"type": "refresh", "token": fresh, "correlationId": "r"})
    assert (await next_message(short))["type"] == "refreshed"

    # The broker loses messages while history keeps only one: the hub cannot repair the gap.
    await broker.unsubscribe("transactions:C1")
    for _ in range(3):
        await publish(client, settings, {"type": "transaction_update", "data": txn()})
    await broker.subscribe("transactions:C1")
    await publish(client, settings, {"type": "transaction_update", "data": txn()})
    resync = await next_message(ws)
    assert resync["type"] == "resync"
    # What history still holds follows the resync, from its position on.
    assert (await next_message(ws))["offset"] == resync["position"]["offset"] + 1

    await send(ws, {"type": "unsubscribe", "channel": "transactions", "filters": {"customerId": "C1"}})
    assert (await next_message(ws))["type"] == "unsubscribed"

    # Resuming: once within the history, once from a position it no longer holds.
    epoch = ack["position"]["epoch"]
    other = await connect(client, token_for(settings, sub="alice", customers=["C1"]))
    resumed = await subscribe(other, since={"offset": 7, "epoch": epoch})
    # The ack repeats the position it resumes from; the replayed events follow it.
    assert (resumed["recovered"], resumed["replayed"], resumed["position"]) == (True, 1, {"offset": 7, "epoch": epoch})
    assert (await receive_json(other))["offset"] == 8
    await send(other, {"type": "unsubscribe", "channel": "transactions"})
    assert (await receive_json(other))["type"] == "unsubscribed"
    stale = await subscribe(other, since={"offset": 1, "epoch": epoch})
    assert stale["recovered"] is False

    assert seen == SERVER_TYPES | {"event"}, f"not exercised: {sorted(SERVER_TYPES | {'event'} - seen)}"


def test_asyncapi_document_names_every_schema_and_channel() -> None:
    document = yaml.safe_load(ASYNCAPI.read_text())
    assert document["asyncapi"].startswith("3.0")
    messages = document["components"]["messages"]
    referenced = {m["payload"]["schema"]["$ref"] for m in messages.values()}
    assert referenced == {f"./schemas/{p.name}" for p in SCHEMA_DIR.glob("*.json") if p.name != "common.json"}
    channel = document["channels"]["transactions"]
    assert channel["address"] == "/ws/transactions"
    operations = document["operations"]
    sent_by_client = {
        ref["$ref"].rsplit("/", 1)[1]
        for op in operations.values()
        if op["action"] == "receive"
        for ref in op["messages"]
    }
    sent_by_server = {
        ref["$ref"].rsplit("/", 1)[1] for op in operations.values() if op["action"] == "send" for ref in op["messages"]
    }
    assert sent_by_client == CLIENT_TYPES
    assert sent_by_server == SERVER_TYPES | {"event"}
    for op in operations.values():
        for ref in op["messages"]:
            name = ref["$ref"].rsplit("/", 1)[1]
            assert ref["$ref"] == f"#/channels/transactions/messages/{name}"
            assert channel["messages"][name]["$ref"] == f"#/components/messages/{name}"


def test_asyncapi_close_codes_match_the_service() -> None:
    codes = yaml.safe_load(ASYNCAPI.read_text())["x-close-codes"]
    assert {c["code"]: c["name"] for c in codes} == {int(code): code.name.lower() for code in CloseCode}
    assert {c["code"] for c in codes if c["reconnect"] is True} == {int(code) for code in RECONNECT_CODES}


def test_asyncapi_document_is_valid_asyncapi_3_0() -> None:
    default = ROOT / ".cache" / "asyncapi-specs-6.11.1" / "package" / "schemas" / "3.0.0-without-$id.json"
    path = Path(os.environ.get("EVA_WS_ASYNCAPI_SCHEMA", default))
    assert path.is_file(), (
        f"the AsyncAPI 3.0.0 JSON Schema is missing at {path}: scripts/test fetches it "
        "(scripts/lib/browser.sh ensure_asyncapi_schema), or set EVA_WS_ASYNCAPI_SCHEMA"
    )
    schema = json.loads(path.read_text())
    errors = list(Draft7Validator(schema).iter_errors(yaml.safe_load(ASYNCAPI.read_text())))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message[:200]}" for e in errors]
