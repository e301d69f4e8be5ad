"""The documented wire format and the code agree, and the envelope codec rejects what it should."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from service import redis_keys
from service.broker import redis_wire as wire
from service.broker.base import Envelope

DOC = Path(__file__).resolve().parent.parent / "docs" / "redis-wire-format.md"


def test_document_quotes_the_publish_script_and_its_sha() -> None:
    text = DOC.read_text()
    assert wire.PUBLISH_SCRIPT in text
    assert hashlib.sha1(wire.PUBLISH_SCRIPT.encode()).hexdigest() in text


def test_key_names_are_the_documented_ones() -> None:
    assert redis_keys.pubsub_channel("p:", "transactions:C1") == "p:transactions:C1"
    assert redis_keys.meta_key("", "transactions:C1") == "meta:{transactions:C1}"
    assert redis_keys.stream_key("", "transactions:C1") == "history:{transactions:C1}"
    assert redis_keys.idempotency_key_name("", "transactions:C1", "evt-42") == "idempotency:{transactions:C1}:evt-42"
    assert "`idempotency:{transactions:C1}:evt-42`" in DOC.read_text()
    assert redis_keys.state_key("", "transactions:C1") == "state:{transactions:C1}"
    assert redis_keys.state_order_key("", "transactions:C1") == "state_order:{transactions:C1}"
    assert "`state:{transactions:C1}`, `state_order:{transactions:C1}`" in DOC.read_text()


def test_envelope_round_trips() -> None:
    data = wire.encode_envelope(42, "9f3c2a1be0d4c5f6", b'{"a":"\n"}')
    assert data == b'e1:42:9f3c2a1be0d4c5f6\n{"a":"\n"}'
    assert wire.decode_envelope(data) == wire.WireEvent(offset=42, epoch="9f3c2a1be0d4c5f6", payload=b'{"a":"\n"}')


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"transaction_update"}',
        b"e2:1:abc\n{}",
        b"e1:0:abc\n{}",
        b"e1:01:abc\n{}",
        b"e1:-1:abc\n{}",
        b"e1:1:\n{}",
        b"e1:1:a b\n{}",
        b"e1:1:abc:x\n{}",
        b"e1:1:abc\n",
        b"e1:99999999999999999999:abc\n{}",
        b"",
    ],
)
def test_malformed_envelopes_are_rejected(data: bytes) -> None:
    with pytest.raises(wire.MalformedEnvelope):
        wire.decode_envelope(data)


def test_epochs_are_valid_on_the_wire() -> None:
    epoch = wire.new_epoch()
    assert wire.decode_envelope(wire.encode_envelope(1, epoch, b"{}")).epoch == epoch


def test_document_gives_the_cluster_publish_script_sha_and_its_only_difference() -> None:
    text = DOC.read_text()
    assert hashlib.sha1(wire.CLUSTER_PUBLISH_SCRIPT.encode()).hexdigest() in text
    different = set(wire.CLUSTER_PUBLISH_SCRIPT.splitlines()) - set(wire.PUBLISH_SCRIPT.splitlines())
    assert different == {
        "-- eva-ws cluster publish v3",
        "redis.call('SPUBLISH', ARGV[3], 'e1:' .. id .. ':' .. epoch .. '\\n' .. ARGV[5])",
    }
    for line in different:
        assert line in text


def test_cluster_names_share_the_channel_hash_tag() -> None:
    assert redis_keys.shard_channel("app1:", "transactions:C1") == "app1:{transactions:C1}"
    assert "`app1:{transactions:C1}`" in DOC.read_text()


def test_an_envelope_decodes_straight_into_the_channels_envelope() -> None:
    data = wire.encode_envelope(7, "9f3c2a1be0d4c5f6", b"{}")
    for _ in range(2):  # the second time with the epoch already known
        assert wire.decode_envelope_of("transactions:C1", data) == Envelope(
            channel="transactions:C1", offset=7, epoch="9f3c2a1be0d4c5f6", payload=b"{}"
        )
    with pytest.raises(wire.MalformedEnvelope):
        wire.decode_envelope_of("transactions:C1", b"e1:7:9f3c2a1be0d4c5f6:x\n{}")
