"""Live delivery: a slot map, one ShardLink per node that serves channels, channels moved when slots move.

One Redis is a cluster of one node that owns every slot and never moves any: the same
coordinator runs it with classic PUB/SUB (see ShardLink's PubSubKind).
"""

from __future__ import annotations

import asyncio
import random
import weakref
from collections.abc import Callable, Collection
from operator import attrgetter
from typing import Any, Final

import structlog
from redis.asyncio import Redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import RedisError

from service import metrics, redis_keys
from service.broker.base import (
    INTERNAL_CHANNEL_PREFIX,
    BrokerUnavailable,
    Envelope,
    MessageHandler,
    ResubscribedHandler,
)
from service.broker.canary import Canary
from service.broker.redis_pubsub_connection import Endpoint
from service.broker.redis_shard_link import SHARDED, PubSubKind, ShardLink
from service.redis_client import Address, cancel_and_wait

log = structlog.get_logger("eva_ws.broker")

SlotMap = list[Address | None]
"""Owner (master address) of each of the 16384 slots; None for a slot nobody serves."""

# Without any sign of trouble the slot map is still re-read this often, so a failover or a
# resharding that no connection of this pod noticed is picked up anyway.
TOPOLOGY_REFRESH_S: Final = 5.0


class Subscriber:
    """The PUB/SUB side of RedisBroker: the wanted set, and which node delivers each channel.

    It keeps the wanted set and the slot map (CLUSTER SLOTS on a cluster; on one Redis,
    every slot is the one node's), and assigns every wanted channel to the ShardLink of
    the node that owns the channel's slot. A link that loses its node, or is told by the
    node that a slot moved away (a server-sent SUNSUBSCRIBE), asks for a new slot map;
    channels whose owner changed are moved to the new owner's link. After a reconnect or
    a move the channels are reported to `on_resubscribed` once confirmed again, since
    events published in between were not delivered live.
    """

    def __init__(
        self,
        *,
        seeds: list[Address],
        link_client: Callable[[Address], Redis],
        kind: PubSubKind = SHARDED,
        prefix: str,
        pod_id: str,
        on_message: MessageHandler,
        on_resubscribed: ResubscribedHandler,
        ping_interval_s: float,
        pong_timeout_s: float,
        subscribe_timeout_s: float,
        reconnect_min_s: float,
        reconnect_max_s: float,
        topology_refresh_s: float = TOPOLOGY_REFRESH_S,
        on_slot_map_changed: Callable[[], None] = lambda: None,
        canary: Canary | None = None,
        canary_channel: str = "",
    ) -> None:
        """`canary` gets every message of `canary_channel`, a channel kept on the link of its
        slot's master like a wanted one but never reported to the hub nor counted as a
        subscription."""
        """`seeds`: the cluster nodes to ask for the slot map, or (with classic `kind`) the one Redis."""
        self._seeds = list(seeds)
        self._kind = kind
        self._name = redis_keys.shard_channel if kind.sharded else redis_keys.pubsub_channel
        self._canary = canary
        self._canary_channel = canary_channel
        # Channels this pod keeps for itself, beside the hub's wanted set.
        self._private: frozenset[str] = frozenset({canary_channel} if canary is not None else ())
        self._on_slot_map_changed = on_slot_map_changed
        self._link_client = link_client
        self._prefix = prefix
        self._pod_id = pod_id
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._ping_interval_s = ping_interval_s
        self._pong_timeout_s = pong_timeout_s
        self._subscribe_timeout_s = subscribe_timeout_s
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._topology_refresh_s = topology_refresh_s

        self._wanted: set[str] = set()
        self._assigned: dict[str, Address] = {}  # wanted channels with an owner in the slot map
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._slots: SlotMap | None = None
        self._links: dict[Address, ShardLink] = {}
        self._doubt = asyncio.Event()
        self._topology: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()  # links of nodes that left the slot map
        self._map_source: tuple[Address, Redis] | None = None
        self._closed = False
        self._count_subscriptions_when_scraped()

    async def start(self, *, timeout_s: float) -> None:
        """Read the slot map and connect to every master; raise BrokerUnavailable if no node
        answers within `timeout_s`, and keep trying in the background all the same."""
        try:
            async with asyncio.timeout(timeout_s):
                slots = await self._fetch_slots()
        except (TimeoutError, BrokerUnavailable) as exc:
            self._doubt.set()
            self._topology = asyncio.create_task(self._run_topology(), name="redis-cluster-topology")
            raise BrokerUnavailable("no redis cluster node returned the slot map") from exc
        self._apply(slots)
        self._topology = asyncio.create_task(self._run_topology(), name="redis-cluster-topology")

    async def close(self) -> None:
        """Stop every task and connection and fail pending subscribes; idempotent."""
        self._closed = True
        if self._topology is not None:
            await cancel_and_wait(self._topology)
            self._topology = None
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.close()
        for task in list(self._retiring):
            await task
        if self._map_source is not None:
            await self._map_source[1].aclose()
            self._map_source = None
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(BrokerUnavailable("broker closed"))
        self._waiters.clear()

    def not_ready_reasons(self) -> list[str]:
        """`broker_not_ready` without a slot map, with a wanted channel no node serves, or with a
        link that does not answer; else `resubscribe_pending` while a link lacks channels (see
        ShardLink.pending)."""
        if self._closed or self._slots is None or len(self._assigned) != len(self._wanted) + len(self._private):
            return ["broker_not_ready"]
        links = [link for link in self._links.values() if link.wanted]
        if not all(link.answering for link in links):
            return ["broker_not_ready"]
        return ["resubscribe_pending"] if any(link.pending for link in links) else []

    @property
    def subscribed_channels(self) -> frozenset[str]:
        confirmed: set[str] = set()
        for link in self._links.values():
            confirmed |= link.actual & link.wanted
        return frozenset(confirmed & self._wanted)

    @property
    def wanted_count(self) -> int:
        return len(self._wanted)

    @property
    def disconnects(self) -> tuple[int, float]:
        """Connections to masters lost so far, and when the last one was."""
        links = self._links.values()
        return sum(link.disconnects for link in links), max((link.disconnected_at for link in links), default=0.0)

    def links(self) -> dict[Address, frozenset[str]]:
        """Which master delivers which channels right now (for operators and tests)."""
        return {address: frozenset(link.wanted) for address, link in self._links.items()}

    async def subscribe(self, channel: str) -> None:
        """Return once the owning master confirmed the channel; raise BrokerUnavailable (and forget
        the channel) if it does not within `subscribe_timeout_s`."""
        if self._closed:
            raise BrokerUnavailable("broker closed")
        self._wanted.add(channel)
        if channel not in self._assigned:
            self._assign(channel, notice=False)
        # Also after an unsubscribe whose SUNSUBSCRIBE was never sent: no new confirmation will come.
        if self._confirmed(channel):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(waiter)
        try:
            async with asyncio.timeout(self._subscribe_timeout_s):
                await waiter
        except TimeoutError:
            self._drop_waiter(channel, waiter)
            if not self._confirmed(channel) and not self._waiters.get(channel):
                self._forget(channel)
            raise BrokerUnavailable("subscription not confirmed by redis cluster") from None

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivery at once; a subscribe still waiting for this channel returns."""
        if channel not in self._wanted:
            return
        self._forget(channel)
        for waiter in self._waiters.pop(channel, []):
            if not waiter.done():
                waiter.set_result(None)

    def _forget(self, channel: str) -> None:
        self._wanted.discard(channel)
        address = self._assigned.pop(channel, None)
        if address is not None and address in self._links:
            self._links[address].drop(channel)

    def _confirmed(self, channel: str) -> bool:
        address = self._assigned.get(channel)
        link = self._links.get(address) if address is not None else None
        return link is not None and link.confirmed(channel)

    def _drop_waiter(self, channel: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(channel, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._waiters.pop(channel, None)

    def _owner(self, channel: str) -> Address | None:
        if self._slots is None:
            return None
        if not self._kind.sharded:
            return self._seeds[0]  # one Redis serves every channel
        return self._slots[key_slot(self._name(self._prefix, channel).encode())]

    def _assign(self, channel: str, *, notice: bool) -> None:
        """Hand a wanted channel to the link of its slot's master, or leave it unassigned until a new map."""
        address = self._owner(channel)
        if address is None:
            self._assigned.pop(channel, None)
            self._doubt.set()
            return
        self._assigned[channel] = address
        self._link(address).assign(channel, notice=notice)

    def _link(self, address: Address) -> ShardLink:
        link = self._links.get(address)
        if link is None:
            link = ShardLink(
                address=address,
                endpoint=Endpoint.of_client(self._link_client(address)),
                kind=self._kind,
                prefix=self._prefix,
                pod_id=self._pod_id,
                on_envelope=self._deliver,
                on_confirmed=self._link_confirmed,
                on_recovered=self._link_recovered,
                on_topology_doubt=self._topology_doubt,
                ping_interval_s=self._ping_interval_s,
                pong_timeout_s=self._pong_timeout_s,
                subscribe_timeout_s=self._subscribe_timeout_s,
                reconnect_min_s=self._reconnect_min_s,
                reconnect_max_s=self._reconnect_max_s,
                canary_channel=self._canary_channel,
                on_canary=self._canary.received if self._canary is not None else lambda data: None,
            )
            self._links[address] = link
            link.start()
        return link

    # -- callbacks from the links ---------------------------------------------------------

    def _deliver(self, envelope: Envelope) -> None:
        try:
            self._on_message(envelope)
        except Exception:  # one failing handler must not stop delivery of the rest
            log.exception("broker_handler_failed", channel=envelope.channel, offset=envelope.offset)

    def _link_confirmed(self, link: ShardLink, channel: str) -> None:
        if channel in self._private and self._canary is not None:
            self._canary.kick()  # a round trip now, instead of one interval later
        if self._assigned.get(channel) == link.address:
            for waiter in self._waiters.pop(channel, []):
                if not waiter.done():
                    waiter.set_result(None)

    def _link_recovered(self, channels: list[str]) -> None:
        channels = [c for c in channels if c in self._wanted]
        if not channels:
            return
        log.info("broker_resubscribed", pod_id=self._pod_id, channels=len(channels))
        try:
            self._on_resubscribed(channels)
        except Exception:  # same reason as in _deliver
            log.exception("broker_resubscribed_handler_failed", channels=len(channels))

    def _topology_doubt(self) -> None:
        self._doubt.set()

    def _count_subscriptions_when_scraped(self) -> None:
        """Point the subscription gauges at this subscriber's channels, counted at each scrape.

        Counting costs O(channels): done on every change, a pod whose clients subscribe
        10,000 channels paid O(n²). By kind, so the client channels can be checked against
        eva_ws_hub_channels while a lost internal subscription still shows as wanted >
        actual. Scrapes run on the event loop (service/ops.py), so the sets hold still.
        """
        this = weakref.ref(self)  # a closed subscriber must not be kept alive by the registry

        def counter(channels_of: Callable[[Subscriber], Collection[str]], *, internal: bool) -> Callable[[], float]:
            def count() -> float:
                subscriber = this()
                if subscriber is None:
                    return 0.0
                channels = channels_of(subscriber)
                internal_count = sum(1 for channel in channels if channel.startswith(INTERNAL_CHANNEL_PREFIX))
                return float(internal_count if internal else len(channels) - internal_count)

            return count

        for gauge, channels_of in (
            (metrics.BROKER_SUBSCRIPTIONS_WANTED, attrgetter("_wanted")),
            (metrics.BROKER_SUBSCRIPTIONS_ACTUAL, attrgetter("subscribed_channels")),
        ):
            gauge.labels(kind="client").set_function(counter(channels_of, internal=False))
            gauge.labels(kind="internal").set_function(counter(channels_of, internal=True))

    # -- the slot map ----------------------------------------------------------------------

    async def _run_topology(self) -> None:
        """Re-read the slot map when a link doubts it (and every `topology_refresh_s`), paced by backoff."""
        attempt = 0
        while not self._closed:
            try:
                async with asyncio.timeout(self._topology_refresh_s):
                    await self._doubt.wait()
            except TimeoutError:
                pass
            self._doubt.clear()
            try:
                slots = await self._fetch_slots()
            except BrokerUnavailable:
                attempt += 1
                self._doubt.set()
            except Exception:  # the loop must outlive any bug, or moved channels stay deaf
                log.exception("broker_topology_failed", pod_id=self._pod_id)
                attempt += 1
            else:
                attempt = 0
                self._apply(slots)
            # Pacing: a burst of doubts (every link of a dead node) costs one read, not many.
            cap = min(self._reconnect_max_s, self._reconnect_min_s * (1 << min(attempt, 30)))
            await asyncio.sleep(cap / 2 + random.uniform(0, cap / 2))

    def _apply(self, slots: SlotMap) -> None:
        """Adopt a slot map: move channels whose owner changed, open and close links to match."""
        first = self._slots is None
        changed = self._slots != slots
        self._slots = slots
        masters = {address for address in slots if address is not None}
        moved = 0
        # The walk costs O(channels); an unchanged map with nothing displaced or unassigned needs none.
        displaced = any(link.has_displaced for link in self._links.values())
        stale = changed or displaced or len(self._assigned) != len(self._wanted) + len(self._private)
        for channel in list(self._wanted | self._private) if stale else []:
            old = self._assigned.get(channel)
            new = self._owner(channel)
            if old == new and old is not None and old in self._links:
                link = self._links[old]
                if channel not in link.wanted or link.displaced(channel):
                    # The node dropped it, yet the map still names that node: subscribe again there.
                    link.assign(channel, notice=True)
                continue
            if old is not None and old in self._links:
                self._links[old].drop(channel)
            moved += 1
            # Events published while the channel had no subscription here must come from history.
            self._assign(channel, notice=old is not None)
        for address in [a for a in self._links if a not in masters]:
            link = self._links.pop(address)
            task = asyncio.get_running_loop().create_task(link.close(), name="redis-shard-link-close")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        for address in masters:
            self._link(address)
        if (changed or moved) and self._kind.sharded:
            log.info("broker_slot_map", pod_id=self._pod_id, masters=len(masters), moved_channels=moved)
        if changed and not first:
            self._on_slot_map_changed()

    async def _fetch_slots(self) -> SlotMap:
        """CLUSTER SLOTS from the node asked last time if it answers, else from the first that does;
        on one Redis, the node owns every slot."""
        if not self._kind.sharded:
            return [self._seeds[0]] * REDIS_CLUSTER_HASH_SLOTS
        if self._map_source is not None:
            address, client = self._map_source
            try:
                return _slot_map(await client.execute_command("CLUSTER SLOTS"), address)  # type: ignore[no-untyped-call]
            except (RedisError, OSError, TimeoutError, ValueError, IndexError) as exc:
                log.info("broker_slot_map_unavailable", node=f"{address[0]}:{address[1]}", error=type(exc).__name__)
            self._map_source = None
            await client.aclose()
        candidates = list(dict.fromkeys([*self._links, *self._seeds]))
        random.shuffle(candidates)  # spread the reads of many pods over the nodes
        for address in candidates:
            client = self._link_client(address)
            answered = False
            try:
                slots = _slot_map(await client.execute_command("CLUSTER SLOTS"), address)  # type: ignore[no-untyped-call]
                answered = True
            except (RedisError, OSError, TimeoutError, ValueError, IndexError) as exc:
                log.info("broker_slot_map_unavailable", node=f"{address[0]}:{address[1]}", error=type(exc).__name__)
                continue
            finally:
                if not answered:
                    await client.aclose()
            # Kept for the next read: one connection per pod for the slot map, not one per read.
            self._map_source = (address, client)
            return slots
        raise BrokerUnavailable("no cluster node answered CLUSTER SLOTS")


def _slot_map(reply: list[Any], asked: Address) -> SlotMap:
    """Slot owners from a CLUSTER SLOTS reply: [[start, end, [host, port, id, ...], replicas...], ...]."""
    slots: SlotMap = [None] * REDIS_CLUSTER_HASH_SLOTS
    for entry in reply:
        start, end, master = int(entry[0]), int(entry[1]), entry[2]
        host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
        # An empty host means "the node you asked", per the CLUSTER SLOTS documentation.
        address = (host or asked[0], int(master[1]))
        for slot in range(start, end + 1):
            slots[slot] = address
    return slots
