"""The state store's pure parts: which events change a transaction's state, and how versions order."""

from __future__ import annotations

import orjson

from service.broker.state import STATE_DELETE_TYPE, STATE_SET_TYPES, StateChange, is_older, state_change
from service.protocol import TRANSACTION_EVENTS


def test_the_state_types_are_the_protocols_transaction_events() -> None:
    assert STATE_SET_TYPES | {STATE_DELETE_TYPE} == {kind.value for kind in TRANSACTION_EVENTS}


def event(kind: str, **data: object) -> bytes:
    return orjson.dumps({"type": kind, "data": data, "timestamp": "2026-12-01T00:00:00Z", "correlationId": "c"})


def test_a_transaction_event_sets_and_a_delete_removes_its_id() -> None:
    assert state_change(event("transaction_update", id="t1", version=3)) == StateChange(False, "t1", "n:3")
    assert state_change(event("stage_change", id="t1", updatedAt="2026-12-01T00:00:01Z")) == StateChange(
        False, "t1", "s:2026-12-01T00:00:01Z"
    )
    assert state_change(event("transaction_delete", id="t1")) == StateChange(True, "t1", "")


def test_events_that_are_not_about_one_transaction_change_nothing() -> None:
    assert state_change(event("user_update", id="u1")) is None
    assert state_change(event("transaction_update", customerId="C1")) is None
    assert state_change(b"not json") is None
    assert state_change(b"[1]") is None


def test_integer_versions_order_numerically_and_timestamps_as_strings() -> None:
    assert is_older("n:9", "n:10")
    assert not is_older("n:10", "n:9")
    assert not is_older("n:10", "n:10")
    assert is_older("s:2026-12-01T00:00:01Z", "s:2026-12-01T00:00:02Z")


def test_versions_of_different_kinds_or_none_do_not_order() -> None:
    assert not is_older("n:1", "s:2026-12-01T00:00:02Z")
    assert not is_older("", "n:5")
    assert not is_older("n:1", "")
