"""Which sockets of a user or customer are open, on every pod: each pod answers for its own through the broker.

A pod alone knows the subscriptions of its sockets, so the pod that takes
`GET /api/v1/connections` publishes the query on the pod-to-pod broker channel
`#inspect:query`; every pod (the asking one too) answers with its matching sockets on
`#inspect:answers`, and the asking pod gathers the answers that name its query id. It
waits until every pod that presence lists for the customer has answered, and at most
`ANSWER_WAIT_S`: a query by user has no such list, so it always waits that long. On the
embedded broker there is one process, so the pod answers alone, at once. The channels go
through the same broker as events (one Redis, Redis Cluster, or in process): no other
connection or key. Their messages are small and kept by the broker's history like any
channel's (bounded by EVA_WS_HISTORY_SIZE and EVA_WS_HISTORY_TTL_S).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Set
from dataclasses import dataclass
from typing import Any, Final

import orjson

from service.broker.base import Broker, BrokerUnavailable
from service.broker.memory import MemoryBroker
from service.connection import Connection
from service.hub import Hub
from service.log import get_logger
from service.protocol import channel_of_key

log = get_logger("eva_ws.connections_query")

# No client can subscribe to these: "#" is not allowed in a channel's id.
QUERY_CHANNEL: Final = "#inspect:query"
ANSWER_CHANNEL: Final = "#inspect:answers"
# How long the asking pod waits for pods it cannot name (a query by user); one second is
# what the control plane promises for its effects on every pod.
ANSWER_WAIT_S: Final = 1.0
# Queries being gathered on this pod at once; more are refused with 503 rather than queued.
MAX_PENDING_QUERIES: Final = 64
_LISTEN_RETRY_MAX_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Query:
    """Exactly one of the two is set."""

    user_id: str | None = None
    customer_id: str | None = None

    def json(self) -> dict[str, str]:
        return {"userId": self.user_id} if self.user_id is not None else {"customerId": str(self.customer_id)}


@dataclass(slots=True)
class _Pending:
    answers: dict[str, list[dict[str, Any]]]
    expected: frozenset[str]
    done: asyncio.Event


class QueryUnavailable(Exception):
    """The broker cannot carry the query now, or too many are being gathered."""


class ConnectionsQuery:
    """Asks every pod for its matching sockets and answers other pods' queries."""

    def __init__(self, *, broker: Broker, hub: Hub, connections: Set[Connection], pod_id: str) -> None:
        self._broker = broker
        self._hub = hub
        # The pod's open sockets (Lifecycle.connections), read at each query.
        self._connections = connections
        self._pod_id = pod_id
        # Connections keep a monotonic clock; this turns it into wall time. Taken once, so a
        # socket's time, which orders the pages, is the same in every answer.
        self._wall_minus_monotonic = time.time() - time.monotonic()
        # The embedded broker is one process: nobody else to ask.
        self._shared = not isinstance(broker, MemoryBroker)
        self._pending: dict[str, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.listening = asyncio.Event()

    async def _listen(self) -> None:
        """Take both channels, retrying while the broker is down; the broker keeps them after."""
        if not self._shared:
            self.listening.set()
            return
        hub = self._hub
        delay_s = 0.1
        for key, handler in ((QUERY_CHANNEL, self._on_query), (ANSWER_CHANNEL, self._on_answer)):
            while True:
                try:
                    await hub.listen(key, handler)
                    break
                except BrokerUnavailable as error:
                    log.warning("inspect_listen_failed", channel=key, error=str(error))
                    await asyncio.sleep(random.uniform(0, delay_s))
                    delay_s = min(delay_s * 2, _LISTEN_RETRY_MAX_S)
        self.listening.set()

    async def ask(self, query: Query, *, expected_pods: Iterable[str] = ()) -> tuple[list[dict[str, Any]], list[str]]:
        """The matching sockets of every pod that answered, and those pods, sorted."""
        if not self._shared:
            return self.local(query), [self._pod_id]
        if not self.listening.is_set() or len(self._pending) >= MAX_PENDING_QUERIES:
            raise QueryUnavailable("the pods cannot be asked right now")
        query_id = secrets.token_hex(8)
        expected = frozenset(expected_pods) | {self._pod_id}
        pending = self._pending[query_id] = _Pending({}, expected if expected_pods else frozenset(), asyncio.Event())
        try:
            try:
                await self._broker.publish(QUERY_CHANNEL, orjson.dumps({"id": query_id, **query.json()}))
            except BrokerUnavailable as error:
                raise QueryUnavailable(str(error)) from None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ANSWER_WAIT_S):
                    await pending.done.wait()
        finally:
            del self._pending[query_id]
        if self._pod_id not in pending.answers:
            # Our own answer is the one that needs no broker: never leave it out.
            pending.answers[self._pod_id] = self.local(query)
        sockets = [socket for answer in pending.answers.values() for socket in answer]
        return sockets, sorted(pending.answers)

    def local(self, query: Query) -> list[dict[str, Any]]:
        """This pod's sockets that match: O(sockets + subscriptions on this pod)."""
        matching = [
            conn
            for conn in self._connections
            if (query.user_id is not None and conn.principal.user_id == query.user_id)
            or (query.customer_id is not None and query.customer_id in conn.principal.customer_ids)
        ]
        if not matching:
            return []
        subscriptions: dict[int, list[dict[str, Any]]] = {id(conn): [] for conn in matching}
        for sub in self._hub.subscriptions():
            listed = subscriptions.get(id(sub.recipient))
            if listed is not None:
                channel = channel_of_key(sub.key).value
                listed.append({"channel": channel, "subscription": sub.key, "filters": sub.filters.to_json()})
        return [
            {
                "connId": conn.conn_id,
                "userId": conn.principal.user_id,
                "podId": self._pod_id,
                "connectedAt": conn.opened_at + self._wall_minus_monotonic,
                "customerIds": list(conn.principal.customer_ids),
                "subscriptions": sorted(subscriptions[id(conn)], key=lambda s: s["subscription"]),
            }
            for conn in matching
        ]

    def _on_query(self, payload: bytes) -> None:
        try:
            message = orjson.loads(payload)
            query = Query(user_id=message.get("userId"), customer_id=message.get("customerId"))
            query_id = str(message["id"])
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            log.warning("inspect_query_dropped")
            return
        answer = orjson.dumps({"id": query_id, "podId": self._pod_id, "connections": self.local(query)})
        task = asyncio.ensure_future(self._answer(answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, answer: bytes) -> None:
        try:
            await self._broker.publish(ANSWER_CHANNEL, answer)
        except BrokerUnavailable as error:
            log.warning("inspect_answer_failed", error=str(error))

    def _on_answer(self, payload: bytes) -> None:
        try:
            message = orjson.loads(payload)
            pending = self._pending.get(message["id"])
            if pending is None:
                return  # another pod's query, or one that gave up waiting
            pod_id, connections = str(message["podId"]), list(message["connections"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("inspect_answer_dropped")
            return
        pending.answers[pod_id] = connections
        if pending.expected and pending.expected <= pending.answers.keys():
            pending.done.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Listen (and keep trying to) while inside; stop answering on the way out."""
        listener = asyncio.ensure_future(self._listen())
        try:
            yield
        finally:
            for task in (listener, *self._tasks):
                task.cancel()
            await asyncio.gather(listener, *self._tasks, return_exceptions=True)
