"""The JSON Schemas in docs/schemas, loaded once, and assertions that a message conforms."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Final

from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

SCHEMA_DIR: Final = Path(__file__).resolve().parent.parent / "docs" / "schemas"
EVENT_TYPES: Final = frozenset(
    {"transaction_update", "transaction_new", "transaction_delete", "stage_change", "user_update", "notification"}
)
SERVER_TYPES: Final = frozenset(
    {
        "subscribed",
        "unsubscribed",
        "pong",
        "error",
        "resync",
        "refreshed",
        "presence_join",
        "presence_leave",
        "snapshot",
    }
)
CLIENT_TYPES: Final = frozenset({"subscribe", "unsubscribe", "ping", "refresh"})


@functools.cache
def validator(name: str) -> Draft7Validator:
    """The validator of docs/schemas/<name>.json; `$ref`s between the files resolve by file name."""
    registry: Registry[Any] = Registry().with_resources(
        (path.name, Resource.from_contents(json.loads(path.read_text()), default_specification=DRAFT7))
        for path in SCHEMA_DIR.glob("*.json")
    )
    schema = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema, registry=registry)


def schema_name(message: dict[str, Any], *, from_server: bool) -> str:
    kind = message.get("type")
    if from_server and kind in EVENT_TYPES:
        return "event"
    known = SERVER_TYPES if from_server else CLIENT_TYPES
    assert kind in known, f"no schema for a {'server' if from_server else 'client'} message of type {kind!r}"
    return str(kind)


def _assert_valid(name: str, message: dict[str, Any]) -> None:
    errors = sorted(validator(name).iter_errors(message), key=lambda e: list(e.path))
    assert not errors, f"{name} message does not match docs/schemas/{name}.json: " + "; ".join(
        f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors
    )


def assert_server_message(message: dict[str, Any]) -> None:
    _assert_valid(schema_name(message, from_server=True), message)


def assert_client_message(message: dict[str, Any]) -> None:
    _assert_valid(schema_name(message, from_server=False), message)
