"""Every Redis key and channel name eva-ws uses, and the hash-tag rule they follow.

Rule: every key a script touches together carries the same hash tag (the part in braces), on
every topology. Redis Cluster puts keys with one tag in one slot, so each script call stays on
one master; on one Redis the braces are just part of the name. A shard channel that a script
SPUBLISHes to carries the tag of the script's keys. Keys that are only ever read or written
alone (heartbeats, the rebalance report) need no tag. `prefix` is EVA_WS_REDIS_PREFIX. The
broker's names are part of its wire format (docs/redis-wire-format.md).
"""

from __future__ import annotations


def tagged(text: str) -> str:
    """`text` as a hash tag: every key that embeds it lives in the slot of `text`."""
    return f"{{{text}}}"


# -- the broker (wire format) ----------------------------------------------------------------


def pubsub_channel(prefix: str, channel: str) -> str:
    """The Redis PUB/SUB channel of a broker channel on one Redis."""
    return prefix + channel


def shard_channel(prefix: str, channel: str) -> str:
    """The sharded PUB/SUB channel of a broker channel on Redis Cluster.

    SPUBLISH inside the publish script may only name a channel of the script's own slot,
    so the channel carries the same hash tag as the channel's keys.
    """
    return f"{prefix}{tagged(channel)}"


def meta_key(prefix: str, channel: str) -> str:
    """Hash with fields `epoch` and `offset` (the newest offset of the epoch)."""
    return f"{prefix}meta:{tagged(channel)}"


def stream_key(prefix: str, channel: str) -> str:
    """Stream holding the channel's retained events; entry id `<offset>-0`, field `p` = payload."""
    return f"{prefix}history:{tagged(channel)}"


def idempotency_key_name(prefix: str, channel: str, key: str) -> str:
    """String `<offset>:<epoch>` of the event published with idempotency key `key`, expiring with the window."""
    # The channel's hash tag comes first, so the key lives in the channel's slot whatever `key` holds.
    return f"{prefix}idempotency:{tagged(channel)}:{key}"


def state_key(prefix: str, channel: str) -> str:
    """Hash transaction id -> `<version>\\n<payload>` of the event that set the transaction's state."""
    return f"{prefix}state:{tagged(channel)}"


def state_order_key(prefix: str, channel: str) -> str:
    """Sorted set of the state's transaction ids, scored by the offset that last changed each (oldest dropped first)."""
    return f"{prefix}state_order:{tagged(channel)}"


# -- presence, connection caps, rebalance -------------------------------------------------------


def presence_entries(prefix: str, customer_id: str) -> str:
    """Hash conn_id -> entry JSON of one customer."""
    return f"{prefix}presence:{tagged(customer_id)}"


def presence_counts(prefix: str, customer_id: str) -> str:
    """Hash instance -> number of that instance's entries; same slot as `presence_entries`."""
    return f"{prefix}presence_count:{tagged(customer_id)}"


def presence_heartbeat_prefix(prefix: str) -> str:
    """Followed by a pod instance: the string whose TTL keeps that instance's entries alive."""
    return f"{prefix}presence_pod:"


def connection_leases(prefix: str, cap_key: str) -> str:
    """Sorted set of the leases counted against one connection cap (`user:<id>`, `ip:<addr>`)."""
    return f"{prefix}conns:{tagged(cap_key)}"


def rebalance_report(prefix: str) -> str:
    """Hash pod id -> "<connections>:<unix ms>" of every live pod."""
    return f"{prefix}rebalance:connections"
