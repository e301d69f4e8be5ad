"""The read side of the transactional outbox: every pod relays committed eva_ws_outbox rows to the broker."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

from service import metrics
from service.broker.base import BrokerUnavailable
from service.config import Settings
from service.log import get_logger
from service.publisher import InvalidEvent, PreparedEvent, Publisher, prepare_event_object

if TYPE_CHECKING:
    import psycopg

log = get_logger("eva_ws.outbox_relay")

# deploy/sql/outbox.sql's trigger notifies this channel when a transaction with outbox rows commits.
NOTIFY_CHANNEL: Final = "eva_ws_outbox"
# The advisory-lock namespace of relaying a channel (writers use 1702257015 for their turns).
RELAY_LOCK_NAMESPACE: Final = 1702257016
RECONNECT_MIN_S: Final = 0.1
RECONNECT_MAX_S: Final = 5.0
# A PostgreSQL that stops answering (a dead host, a black-holed link) is given up on within about
# 25 s by TCP keepalives, then reconnected like one that closed the connection.
_CONNECTION_OPTIONS: Final[dict[str, Any]] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "application_name": "eva-ws-outbox-relay",
}

# A pod relays a channel only while it holds the channel's lock, and always the channel's oldest
# rows: so a channel's rows reach the broker in id order, which deploy/sql/outbox.sql makes commit
# order, whichever pods share the work. Channels are picked among the oldest rows, so every
# channel's head gets its turn; a channel another pod is relaying is skipped, not waited for.
_CLAIM_CHANNELS: Final = """
SELECT channel FROM (
    SELECT channel, min(id) AS head
    FROM (SELECT channel, id FROM eva_ws_outbox ORDER BY id LIMIT %(scan)s) AS oldest
    GROUP BY channel
) AS heads
WHERE pg_try_advisory_xact_lock(%(namespace)s, hashtext(channel))
ORDER BY head
"""
# A fresh snapshot, taken once the channels' locks are held: no other pod removes their rows now.
_CLAIM_ROWS: Final = """
SELECT id, channel, event, extract(epoch FROM clock_timestamp() - created_at)::float8
FROM eva_ws_outbox WHERE channel = ANY(%(channels)s)
ORDER BY id LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""
_REJECT: Final = """
INSERT INTO eva_ws_outbox_rejected (id, channel, event, created_at, error)
SELECT o.id, o.channel, o.event, o.created_at, r.error
FROM eva_ws_outbox AS o JOIN unnest(%(ids)s::bigint[], %(errors)s::text[]) AS r(id, error) ON o.id = r.id
ON CONFLICT (id) DO NOTHING
"""
_DELETE: Final = "DELETE FROM eva_ws_outbox WHERE id = ANY(%(ids)s)"
_DEPTH: Final = """
SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8 FROM eva_ws_outbox
"""


@dataclass(frozen=True, slots=True)
class Claimed:
    """One claimed row: its event ready for the broker, or why it cannot be published."""

    row_id: int
    age_s: float
    event: PreparedEvent | None
    error: str | None = None


def idempotency_key(row_id: int) -> str:
    """The key a row is published with: a republished row (after a crash) is not delivered twice."""
    return f"outbox:{row_id}"


def check_row(row_id: int, channel: str, event: Any, age_s: float) -> Claimed:
    """A row's event checked as POST /api/v1/publish checks it, and against the row's channel."""
    try:
        prepared = prepare_event_object(event)
    except InvalidEvent as error:
        return Claimed(row_id, age_s, None, str(error))
    if prepared.subscription != channel:
        return Claimed(row_id, age_s, None, f"the row's channel is not the event's ({prepared.subscription})")
    return Claimed(row_id, age_s, replace(prepared, idempotency_key=idempotency_key(row_id)))


class OutboxRelay:
    """Publishes the rows of eva_ws_outbox through the broker, then deletes them, in one transaction.

    Delivery: at least once into the broker, made exactly once by the rows' idempotency keys
    (within EVA_WS_IDEMPOTENCY_WINDOW_S). Order: commit order per channel (see _CLAIM_CHANNELS).
    Woken by NOTIFY at each commit; polls every `poll_interval_s` in case a notification was
    missed (a reconnect). While PostgreSQL or the broker is down it retries with capped,
    jittered backoff; rows wait in the table meanwhile.
    """

    def __init__(self, dsn: str, publisher: Publisher, *, batch_size: int, poll_interval_s: float) -> None:
        self._dsn = dsn
        self._publisher = publisher
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._gauges_at = 0.0
        # Whether the last connection got as far as relaying: then the next reconnect starts from the shortest backoff.
        self._served_a_batch = False

    @classmethod
    def from_settings(cls, settings: Settings, publisher: Publisher) -> OutboxRelay:
        """The relay of EVA_WS_OUTBOX_DSN (which must be set), publishing through `publisher`."""
        assert settings.outbox_dsn is not None, "EVA_WS_OUTBOX_DSN is not set"
        return cls(
            settings.outbox_dsn,
            publisher,
            batch_size=settings.outbox_batch_size,
            poll_interval_s=settings.outbox_poll_interval_s,
        )

    @property
    def ready(self) -> bool:
        """True while connected to PostgreSQL and listening for commits."""
        return self._connected

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._set_connected(False)

    def _set_connected(self, connected: bool) -> None:
        self._connected = connected
        metrics.OUTBOX_READY.set(1 if connected else 0)

    async def _run(self) -> None:
        import psycopg

        attempt = 0
        while True:
            try:
                await self._serve()
            except (psycopg.Error, OSError) as error:
                log.warning("outbox_relay_disconnected", error=type(error).__name__, detail=str(error)[:200])
            except Exception:
                # Anything else is a defect; the relay must outlive it, or the outbox would silently fill up.
                log.exception("outbox_relay_failed")
            self._set_connected(False)
            attempt = 0 if self._served_a_batch else attempt + 1
            await asyncio.sleep(_backoff_s(attempt))

    async def _serve(self) -> None:
        """Relay on one pair of connections until one fails."""
        import psycopg

        self._served_a_batch = False
        async with (
            await psycopg.AsyncConnection.connect(self._dsn, autocommit=True, **_CONNECTION_OPTIONS) as listener,
            await psycopg.AsyncConnection.connect(self._dsn, autocommit=True, **_CONNECTION_OPTIONS) as worker,
        ):
            await listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self._set_connected(True)
            log.info("outbox_relay_connected", batch_size=self._batch_size)
            broker_attempt = 0
            while True:
                try:
                    while await self._relay_batch(worker) == self._batch_size:
                        await self._refresh_gauges(worker)
                    broker_attempt = 0
                except BrokerUnavailable as error:
                    log.warning("outbox_relay_broker_unavailable", error=str(error)[:200])
                    broker_attempt += 1
                    await asyncio.sleep(_backoff_s(broker_attempt))
                    continue
                self._served_a_batch = True
                await self._refresh_gauges(worker)
                # Until a commit notifies, or the poll interval passes.
                async for _ in listener.notifies(timeout=self._poll_interval_s, stop_after=1):
                    pass

    async def _relay_batch(self, worker: psycopg.AsyncConnection[Any]) -> int:
        """Claim, publish and delete one batch in one transaction; return how many rows it held."""
        async with worker.transaction():
            cursor = await worker.execute(
                _CLAIM_CHANNELS, {"scan": self._batch_size, "namespace": RELAY_LOCK_NAMESPACE}
            )
            channels = [row[0] for row in await cursor.fetchall()]
            if not channels:
                return 0
            cursor = await worker.execute(_CLAIM_ROWS, {"channels": channels, "limit": self._batch_size})
            claimed = [check_row(*row) for row in await cursor.fetchall()]
            started = time.monotonic()
            publishable = [c for c in claimed if c.event is not None]
            if publishable:
                await self._publisher.publish_prepared([c.event for c in publishable if c.event is not None])
            rejected = [c for c in claimed if c.error is not None]
            if rejected:
                await worker.execute(
                    _REJECT, {"ids": [c.row_id for c in rejected], "errors": [c.error for c in rejected]}
                )
                for c in rejected:
                    log.error("outbox_row_rejected", row_id=c.row_id, error=c.error)
            await worker.execute(_DELETE, {"ids": [c.row_id for c in claimed]})
        published_s = time.monotonic() - started
        for c in publishable:
            metrics.OUTBOX_RELAY_LAG.observe(c.age_s + published_s)
        metrics.OUTBOX_RELAYED.labels("published").inc(len(publishable))
        metrics.OUTBOX_RELAYED.labels("rejected").inc(len(rejected))
        log.debug("outbox_batch_relayed", rows=len(claimed), channels=len(channels))
        return len(claimed)

    async def _refresh_gauges(self, worker: psycopg.AsyncConnection[Any]) -> None:
        # count(*) reads the whole table: at most once per poll interval per pod.
        now = time.monotonic()
        if now - self._gauges_at < self._poll_interval_s:
            return
        self._gauges_at = now
        cursor = await worker.execute(_DEPTH)
        row = await cursor.fetchone()
        if row is not None:
            metrics.OUTBOX_DEPTH.set(row[0])
            metrics.OUTBOX_OLDEST_AGE.set(row[1])


def _backoff_s(attempt: int) -> float:
    # Equal jitter: never zero (no hot loop), never synchronised across pods.
    cap = min(RECONNECT_MAX_S, RECONNECT_MIN_S * (1 << min(attempt, 30)))
    return cap / 2 + random.uniform(0, cap / 2)
