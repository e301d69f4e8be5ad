"""prepare_event works out an event's state change from its data; it must be what the broker would parse."""

from __future__ import annotations

import enum
import uuid
from collections.abc import AsyncIterator

import pytest

from fleet.redis_server import RedisServer
from service.broker.redis import RedisBroker
from service.broker.state import state_change
from service.publisher import CORRELATION_IDS_AT_ONCE, new_correlation_id, prepare_event
from tests.broker_contract import new_channel
from tests.test_broker_redis import redis_factory


class Level(enum.IntEnum):
    HIGH = 7


class Stamp(str):
    def __str__(self) -> str:
        return "not the text"


@pytest.mark.parametrize(
    ("event_type", "extra"),
    [
        ("transaction_update", {}),
        ("transaction_update", {"version": 3}),
        ("transaction_update", {"version": -12, "updatedAt": "2026-01-01T00:00:00Z"}),
        ("transaction_update", {"version": True, "updatedAt": "2026-01-01T00:00:00Z"}),
        ("transaction_update", {"version": 2.5, "updatedAt": "2026-01-01T00:00:00Z"}),
        ("transaction_update", {"version": "7"}),
        ("transaction_update", {"version": Level.HIGH}),
        ("transaction_new", {"updatedAt": "2026-01-01T00:00:00Z"}),
        ("transaction_new", {"updatedAt": "a\nb"}),
        ("stage_change", {"updatedAt": Stamp("2026-01-02T00:00:00Z")}),
        ("transaction_delete", {"version": 9}),
        ("transaction_delete", {}),
    ],
)
def test_prepared_state_is_the_parsed_one(event_type: str, extra: dict[str, object]) -> None:
    event = prepare_event(event_type, {"id": "T-1", "customerId": "C1", **extra})
    assert event.state is not None
    assert event.state == state_change(event.payload)


def test_events_without_a_transaction_change_no_state() -> None:
    event = prepare_event("notification", {"text": "hi"}, channel="notifications", user_id="U1")
    assert event.state is None
    assert state_change(event.payload) is None


def test_correlation_ids_are_version_4_uuids_and_unique() -> None:
    ids = [new_correlation_id() for _ in range(CORRELATION_IDS_AT_ONCE * 3 + 5)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


@pytest.fixture
async def redis_broker(redis_server: RedisServer) -> AsyncIterator[RedisBroker]:
    made = redis_factory(redis_server, state_max_items=3)()
    assert isinstance(made, RedisBroker)
    await made.start()
    yield made
    await made.close()


async def test_states_given_to_the_redis_broker_leave_the_state_parsing_would(redis_broker: RedisBroker) -> None:
    given, parsed = new_channel(), new_channel()
    events = [
        prepare_event(kind, {"id": f"T{n % 4}", "customerId": "C1", "version": n % 5})
        for n, kind in enumerate(["transaction_new", "transaction_update", "transaction_delete", "stage_change"] * 30)
    ]
    for channel, states in ((given, [e.state for e in events]), (parsed, None)):
        await redis_broker.publish_many([(channel, e.payload) for e in events], states=states)
        # One event alone goes through publish.lua, with its state too.
        await redis_broker.publish_many([(channel, events[1].payload)], states=None if states is None else states[1:2])
    assert (await redis_broker.snapshot(given)).payloads == (await redis_broker.snapshot(parsed)).payloads
    # The broker takes the states it is given: no change given, none made (the payloads are not parsed).
    ignored = new_channel()
    await redis_broker.publish_many([(ignored, e.payload) for e in events], states=[None] * len(events))
    assert (await redis_broker.snapshot(ignored)).payloads == []
    with pytest.raises(ValueError, match="one state change"):
        await redis_broker.publish_many([(given, e.payload) for e in events], states=[None])
