"""The names of eva-ws's Redis keys outside the broker's wire format, and the hash-tag rule they follow.

Rule: every key a script touches together carries the same hash tag (the part in braces), on
every topology. Redis Cluster puts keys with one tag in one slot, so each script call stays on
one master; on one Redis the braces are just part of the name. Keys that are only ever read or
written alone (heartbeats, the rebalance report) need no tag. The broker's channels and keys
follow the same rule in `service/broker/redis_wire.py`. `PREFIX` is EVA_WS_REDIS_PREFIX.
"""

from __future__ import annotations


def tagged(text: str) -> str:
    """`text` as a hash tag: every key that embeds it lives in the slot of `text`."""
    return f"{{{text}}}"


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
