"""The traffic of a chaos run: publishers that retry (or outbox writers), and resuming clients (Python and Node).

Publishers write every attempt into the ledger, outbox writers every transaction's outcome; clients
write every message their live socket receives into their log. Both are the checker's only inputs
(fleet.chaos.checker).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final, cast

import aiohttp

from fleet.chaos.checker import (
    Attempt,
    ClientLog,
    CommitOutcome,
    Kind,
    OutboxWrite,
    Outcome,
    PublishedEvent,
    Record,
)
from fleet.resuming_client import ResumingClient
from service.postgres_outbox import enqueue

NODE: Final = shutil.which("node") or "node"
NODE_CLIENT: Final = Path(__file__).with_name("node_client.mjs")
ATTEMPT_TIMEOUT_S: Final = 2.0
GIVE_UP_AFTER_S: Final = 30.0  # a publisher retries one event this long, then moves on
RECORDED: Final = frozenset({"subscribed", "resync"})


def to_record(message: dict[str, Any], at_s: float) -> Record | None:
    """The checker's view of one server message, or None for replies it does not judge."""
    kind = message.get("type")
    if kind in RECORDED:
        position = message["position"]
        recovered = message.get("recovered")
        return Record(Kind(kind), message["subscription"], position["offset"], position["epoch"], at_s, recovered)
    if isinstance(message.get("offset"), int) and isinstance(message.get("subscription"), str):
        return Record(
            Kind.EVENT,
            message["subscription"],
            message["offset"],
            message["epoch"],
            at_s,
            event_id=message.get("correlationId"),
            event_type=kind,
            data=message.get("data"),
        )
    return None


class Publisher:
    """Publishes the versions of its own transactions in order, retrying each event until a 2xx or the give-up time.

    The event's correlationId is its identity in the ledger, the same on every retry; with
    `idempotency_keys` it is also sent as `idempotencyKey`.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        token: str,
        *,
        transactions: list[tuple[str, str]],
        rng: random.Random,
        idempotency_keys: bool,
        name: str,
    ) -> None:
        self.session = session
        self.url = f"{url}/api/v1/publish"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.transactions = transactions  # (customer, transaction id)
        self.rng = rng
        self.idempotency_keys = idempotency_keys
        self.name = name
        self.ledger: list[PublishedEvent] = []
        self.versions: dict[str, int] = {}

    def next_event(self, customer: str, transaction: str) -> PublishedEvent:
        version = self.versions[transaction] = self.versions.get(transaction, 0) + 1
        if version == 1:
            event_type = "transaction_new"
        else:
            event_type = self.rng.choices(["transaction_update", "stage_change"], weights=[4, 1])[0]
        data = {
            "id": transaction,
            "customerId": customer,
            "status": f"version-{version}",
            "stage": f"stage-{version % 5}",
            "updatedBy": self.name,
        }
        event_id = f"{self.name}-{transaction}-{version}"
        return PublishedEvent(event_id, f"transactions:{customer}", transaction, event_type, data)

    async def publish(self, event: PublishedEvent, *, give_up_after_s: float = GIVE_UP_AFTER_S) -> bool:
        """Attempt until a 2xx (True) or the give-up time (False); every attempt goes into the event."""
        self.ledger.append(event)
        body: dict[str, Any] = {"type": event.event_type, "data": event.data, "correlationId": event.event_id}
        if self.idempotency_keys:
            body["idempotencyKey"] = event.event_id
        deadline = time.monotonic() + give_up_after_s
        backoff_s = 0.1
        while True:
            attempt = await self._attempt(body)
            event.attempts.append(attempt)
            if attempt.outcome is Outcome.ACCEPTED:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(self.rng.uniform(0, backoff_s))
            backoff_s = min(2.0, backoff_s * 2)

    async def _attempt(self, body: dict[str, Any]) -> Attempt:
        try:
            async with self.session.post(
                self.url, json=body, headers=self.headers, timeout=aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT_S)
            ) as response:
                if 200 <= response.status < 300:
                    answer = await response.json()
                    return Attempt(Outcome.ACCEPTED, time.time(), answer["offset"], answer["epoch"])
                await response.read()
                # A 5xx may come after the event was stored (docs/protocol.md, Redis outages).
                outcome = Outcome.AMBIGUOUS if response.status >= 500 else Outcome.REFUSED
                return Attempt(outcome, time.time())
        except aiohttp.ClientConnectorError:
            return Attempt(Outcome.REFUSED, time.time())  # never connected: nothing was sent
        except (TimeoutError, aiohttp.ClientError, OSError):
            return Attempt(Outcome.AMBIGUOUS, time.time())

    async def run(self, stop: asyncio.Event, *, interval_s: float) -> None:
        """Publish one event of a random own transaction every `interval_s` (on average) until `stop`."""
        while not stop.is_set():
            customer, transaction = self.rng.choice(self.transactions)
            await self.publish(self.next_event(customer, transaction))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(0, 2 * interval_s))

    async def settle(self) -> None:
        """One last version of every own transaction, retried for long: the state every client must end with."""
        for customer, transaction in self.transactions:
            await self.publish(self.next_event(customer, transaction), give_up_after_s=120.0)


class OutboxWriter:
    """Inserts events with `enqueue`, one per transaction of its own connection; some transactions roll back.

    Several writers share the channels (customers) and one `commit_order`: right after a commit
    returns, its event takes the channel's next index. The outbox's per-channel lock makes the
    writers of a channel commit one after the other (docs/outbox.md), so that is commit order.
    """

    def __init__(
        self,
        dsn: str,
        *,
        transactions: list[tuple[str, str]],
        rng: random.Random,
        commit_order: dict[str, int],
        name: str,
        rollback_share: float = 0.2,
    ) -> None:
        self.dsn = dsn
        self.transactions = transactions  # (customer, transaction id)
        self.rng = rng
        self.commit_order = commit_order
        self.name = name
        self.rollback_share = rollback_share
        self.writes: list[OutboxWrite] = []
        self.versions: dict[str, int] = {}
        self._connection: Any = None

    async def _connect(self) -> Any:
        import psycopg  # the outbox extra; only an outbox run needs it

        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(self.dsn, connect_timeout=2)
        return self._connection

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def write(self, customer: str, transaction: str, *, rollback: bool) -> CommitOutcome | None:
        """One transaction with one event; None when no connection could be made (nothing was sent)."""
        import psycopg

        try:
            connection = await asyncio.wait_for(self._connect(), ATTEMPT_TIMEOUT_S)
        except (TimeoutError, psycopg.Error, OSError):
            await self._drop()
            return None
        version = self.versions[transaction] = self.versions.get(transaction, 0) + 1
        event_id = f"{self.name}-{transaction}-{version}"
        event_type = "transaction_new" if version == 1 else self.rng.choice(["transaction_update", "stage_change"])
        data = {"id": transaction, "customerId": customer, "status": f"version-{version}", "seq": event_id}
        write = OutboxWrite(
            event_id, f"transactions:{customer}", transaction, event_type, data, CommitOutcome.ROLLED_BACK, 0.0
        )
        self.writes.append(write)
        try:
            await asyncio.wait_for(
                enqueue(connection, {"type": event_type, "data": data, "correlationId": event_id}), ATTEMPT_TIMEOUT_S
            )
            if rollback:
                await asyncio.wait_for(connection.rollback(), ATTEMPT_TIMEOUT_S)
            else:
                try:
                    await asyncio.wait_for(connection.commit(), ATTEMPT_TIMEOUT_S)
                except (TimeoutError, psycopg.Error, OSError):
                    write.outcome = CommitOutcome.UNKNOWN
                    raise
                # No await between the commit's return and its index: the order commits returned.
                write.outcome = CommitOutcome.COMMITTED
                index = self.commit_order[customer] = self.commit_order.get(customer, 0) + 1
                write.commit_index = index
        except (TimeoutError, psycopg.Error, OSError):
            await self._drop()  # a failed statement or a lost server: this transaction did not commit
        write.at_s = time.time()
        return write.outcome

    async def run(self, stop: asyncio.Event, *, interval_s: float) -> None:
        """One transaction of a random own transaction id every `interval_s` (on average) until `stop`."""
        while not stop.is_set():
            customer, transaction = self.rng.choice(self.transactions)
            await self.write(customer, transaction, rollback=self.rng.random() < self.rollback_share)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(0, 2 * interval_s))

    async def settle(self, give_up_after_s: float = 120.0) -> None:
        """One last committed version of every own transaction: the state every client must end with."""
        deadline = time.monotonic() + give_up_after_s
        for customer, transaction in self.transactions:
            while await self.write(customer, transaction, rollback=False) is not CommitOutcome.COMMITTED:
                if time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        await self._drop()


async def idempotency_keys_supported(session: aiohttp.ClientSession, url: str, token: str) -> bool:
    """Ask the server with an event it refuses either way: does it refuse the key, or only the event type?"""
    body = {"type": "not-an-event-type", "data": {}, "idempotencyKey": "probe"}
    async with session.post(
        f"{url}/api/v1/publish", json=body, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        answer = await response.json(content_type=None)
    return "idempotencyKey" not in str(answer.get("message", ""))


class _Tap:
    """A client socket seen through: every received text frame is recorded, then handed on unchanged."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, log: ClientLog) -> None:
        self._ws = ws
        self._log = log

    async def send_json(self, data: Any) -> None:
        await self._ws.send_json(data)

    async def __aiter__(self) -> AsyncIterator[aiohttp.WSMessage]:
        async for frame in self._ws:
            if frame.type is aiohttp.WSMsgType.TEXT:
                record = to_record(json.loads(frame.data), time.time())
                if record is not None:
                    self._log.records.append(record)
            yield frame


class RecordingClient(ResumingClient):
    """The Python resuming client (fleet.resuming_client), recording what its socket receives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log = ClientLog(self.name, "python")

    async def _session(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        return await super()._session(cast(aiohttp.ClientWebSocketResponse, _Tap(ws, self.log)))


class NodeClients:
    """One `node` process running several browser clients (fleet/chaos/node_client.mjs), in its own process group."""

    def __init__(self, specs: list[dict[str, Any]], stderr_path: Path) -> None:
        self.specs = specs
        self.logs = {spec["name"]: ClientLog(spec["name"], "node") for spec in specs}
        self.stderr_path = stderr_path
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with self.stderr_path.open("ab") as stderr:
            self.process = await asyncio.create_subprocess_exec(
                NODE,
                "--experimental-websocket",
                "--no-warnings",
                str(NODE_CLIENT),
                json.dumps({"clients": self.specs}),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            item = json.loads(line)
            log = self.logs[item.pop("client")]
            item["kind"] = Kind(item["kind"])
            log.records.append(Record(**item))

    async def stop(self) -> None:
        """Close stdin (the clients close with 1000), then make sure the whole group is gone."""
        process = self.process
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 5)
