"""Real pods (`python -m service serve`) sharing the test's own redis-server, driven by real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from fleet.process import ServiceProcess
from fleet.redis_server import RedisServer
from fleet.waiting import eventually
from service.broker.canary import CANARY_CHANNEL_PART
from tests.conftest import SECRET, make_settings, metric_value, token_for

SETTINGS = make_settings()
# Short backoff, canary and presence TTL so faults are noticed and healed quickly;
# no assertion depends on them.
FAST_POD: dict[str, str] = {
    "redis_reconnect_max_s": "0.5",
    "broker_canary_interval_s": "0.2",
    "broker_canary_max_lag_s": "2",
    "presence_ttl_s": "3",
    "drain_delay_s": "0",
    "drain_spread_s": "0",
}
PUBLISHER_TOKEN = token_for(SETTINGS, sub="backend", customers=[], roles=["publisher"])
CUSTOMERS = ["C1", "C2", "C3"]


class Client:
    """A WebSocket client that records every message the server sends it."""

    # Every client of the running test, closed by the `session` fixture.
    running: set[Client] = set()

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())
        Client.running.add(self)

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, pod: ServiceProcess, *, user: str = "u1") -> Client:
        token = token_for(SETTINGS, sub=user, customers=CUSTOMERS)
        return cls(await session.ws_connect(f"{pod.url}/ws/transactions?token={token}"))

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                self.messages.append(message.json())

    async def request(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send a message and return the server's reply to it (ack or error)."""
        correlation_id = uuid.uuid4().hex
        await self.ws.send_json({**body, "correlationId": correlation_id})
        replies: list[dict[str, Any]] = []

        def replied() -> bool:
            replies[:] = [
                m
                for m in self.messages
                if m.get("correlationId") == correlation_id and m["type"] in ("subscribed", "unsubscribed", "error")
            ]
            return bool(replies)

        await eventually(replied, f"no reply to {body}")
        return replies[0]

    async def subscribe(self, customer: str, since: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": "subscribe", "channel": "transactions", "filters": {"customerId": customer}}
        if since is not None:
            body["since"] = since
        return await self.request(body)

    async def unsubscribe(self, customer: str) -> dict[str, Any]:
        body = {"type": "unsubscribe", "channel": "transactions", "filters": {"customerId": customer}}
        return await self.request(body)

    def events(self, customer: str = "C1") -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("subscription") == f"transactions:{customer}" and "offset" in m]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind]

    async def close(self) -> None:
        Client.running.discard(self)
        await self.ws.close()
        await self._reader


def event_body(customer: str, seq: int, publisher: int = 0) -> dict[str, Any]:
    # transaction_new is never conflated, so a client sees every one of them.
    return {
        "type": "transaction_new",
        "data": {
            "id": f"T{publisher}-{seq}",
            "customerId": customer,
            "status": "new",
            "stage": "kyc",
            "seq": seq,
            "publisher": publisher,
        },
    }


async def publish(
    session: aiohttp.ClientSession, pod: ServiceProcess, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {PUBLISHER_TOKEN}"}
    async with session.post(f"{pod.url}/api/v1/publish", json=body, headers=headers) as response:
        return response.status, await response.json()


async def readiness(session: aiohttp.ClientSession, pod: ServiceProcess) -> tuple[int, dict[str, Any]]:
    async with session.get(f"{pod.url}/readyz") as response:
        return response.status, await response.json()


async def wait_ready(session: aiohttp.ClientSession, *pods: ServiceProcess, ready: bool = True) -> None:
    for pod in pods:

        async def check(pod: ServiceProcess = pod) -> bool:
            return (await readiness(session, pod))[0] == (200 if ready else 503)

        await eventually(check, f"{pod.url}/readyz never became {'ready' if ready else 'not ready'}")


async def metrics_text(session: aiohttp.ClientSession, pod: ServiceProcess) -> str:
    async with session.get(f"{pod.url}/metrics") as response:
        return await response.text()


def log_events(pod: ServiceProcess, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in pod.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == name]


async def wait_logged(pod: ServiceProcess, name: str) -> list[dict[str, Any]]:
    """The pod's log lines of one event, once there is at least one."""
    await eventually(lambda: bool(log_events(pod, name)), f"{pod.url} never logged {name}")
    return log_events(pod, name)


def has_events(client: Client, count: int) -> Callable[[], bool]:
    return lambda: len(client.events()) >= count


def has_resync(client: Client) -> Callable[[], bool]:
    return lambda: bool(client.of_type("resync"))


def progress(client: Client, count: int) -> Callable[[], str]:
    return lambda: f"{len(client.events())}/{count} events"


PodFactory = Callable[..., list[ServiceProcess]]


@pytest.fixture
def start_pods(tmp_path: Path) -> Iterator[PodFactory]:
    """Start `count` pods on one Redis URL; every pod is stopped after the test."""
    running: list[ServiceProcess] = []

    def start(redis_url: str, count: int = 2, **env: str) -> list[ServiceProcess]:
        pods = [
            ServiceProcess(tmp_path, jwt_secret=SECRET, redis_url=redis_url, **{**FAST_POD, **env})
            for _ in range(count)
        ]
        running.extend(pods)
        for pod in pods:
            pod.start(wait=False)
        for pod in pods:
            pod.wait_healthy()
        return pods

    yield start
    for pod in running:
        pod.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session
        for client in list(Client.running):
            await client.close()


def assert_every_event_once_in_order(client: Client, last_offset: int, total: int) -> None:
    """Offsets 1..last exactly once and in order, one per numbered event, in order.

    A publish that failed while Redis went away may still have landed; the publisher sends it
    again with the same idempotency key, so it is not delivered a second time.
    """
    events = client.events()
    assert [e["offset"] for e in events] == list(range(1, last_offset + 1))
    assert [e["data"]["seq"] for e in events] == list(range(total))


async def test_events_published_concurrently_on_either_pod_reach_every_client_exactly_once_in_order(
    redis_server: RedisServer, start_pods: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod_a, pod_b = start_pods(redis_server.url)
    clients = [await Client.connect(session, pod) for pod in (pod_a, pod_b, pod_a, pod_b)]
    for client in clients:
        ack = await client.subscribe("C1")
        assert ack["type"] == "subscribed"
        assert ack["position"]["offset"] == 0
    publishers, per_publisher = 4, 25

    async def publish_numbered(publisher: int) -> None:
        for seq in range(per_publisher):
            pod = (pod_a, pod_b)[(publisher + seq) % 2]
            status, _ = await publish(session, pod, event_body("C1", seq, publisher))
            assert status == 202

    await asyncio.gather(*(publish_numbered(p) for p in range(publishers)))
    total = publishers * per_publisher
    for client in clients:
        await eventually(has_events(client, total), progress(client, total))
    for client in clients:
        events = client.events()
        assert [e["offset"] for e in events] == list(range(1, total + 1))
        for publisher in range(publishers):
            seqs = [e["data"]["seq"] for e in events if e["data"]["publisher"] == publisher]
            assert seqs == list(range(per_publisher))
        assert len({e["correlationId"] for e in events}) == total


async def test_redis_pubsub_channels_are_the_union_of_what_the_pods_clients_need(
    redis_server: RedisServer, start_pods: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod_a, pod_b = start_pods(redis_server.url)
    raw = Redis.from_url(redis_server.url)
    try:

        async def channels() -> tuple[set[str], int]:
            names = [c.decode() if isinstance(c, bytes) else c for c in await raw.pubsub_channels()]
            canaries = [n for n in names if n.startswith(CANARY_CHANNEL_PART)]
            # Channels between pods (control commands, inspect queries) start with "#", never a client's.
            return {n for n in names if n not in canaries and not n.startswith("#")}, len(canaries)

        async def expect(wanted: set[str]) -> None:
            async def matches() -> bool:
                return await channels() == (wanted, 2)

            await eventually(matches, lambda: f"PUBSUB CHANNELS never became {sorted(wanted)} plus 2 canaries")

        await expect(set())
        on_a, on_b = await Client.connect(session, pod_a), await Client.connect(session, pod_b)
        for client, customers in ((on_a, ["C1", "C2"]), (on_b, ["C2", "C3"])):
            for customer in customers:
                assert (await client.subscribe(customer))["type"] == "subscribed"
        await expect({"transactions:C1", "transactions:C2", "transactions:C3"})
        # One subscription per pod, however many clients the pod has on the channel.
        assert await raw.pubsub_numsub("transactions:C2") == [(b"transactions:C2", 2)]

        assert (await on_a.unsubscribe("C1"))["type"] == "unsubscribed"
        await expect({"transactions:C2", "transactions:C3"})
        await on_b.close()
        await expect({"transactions:C2"})
        assert await raw.pubsub_numsub("transactions:C2") == [(b"transactions:C2", 1)]
        await on_a.close()
        await expect(set())
    finally:
        await raw.aclose()


@pytest.mark.parametrize("fault", ["kill", "restart"])
async def test_clients_get_every_event_exactly_once_across_a_redis_fault_mid_stream(
    fault: str, persistent_redis_server: RedisServer, start_pods: PodFactory, session: aiohttp.ClientSession
) -> None:
    server = persistent_redis_server
    pods = start_pods(server.url)
    await wait_ready(session, *pods)
    clients = [await Client.connect(session, pod) for pod in (*pods, *pods)]
    for client in clients:
        assert (await client.subscribe("C1"))["type"] == "subscribed"
    total = 150
    halfway = asyncio.Event()
    last_offset = 0

    async def publish_numbered() -> None:
        nonlocal last_offset
        for seq in range(total):
            while True:
                try:
                    keyed = {**event_body("C1", seq), "idempotencyKey": f"seq-{seq}"}
                    status, body = await publish(session, pods[seq % 2], keyed)
                except aiohttp.ClientError:
                    status, body = 0, {}
                if status == 202:
                    last_offset = body["offset"]
                    break
                assert status == 503, body
                await asyncio.sleep(0.05)  # the documented reaction: retry with backoff
            if seq == total // 3:
                halfway.set()

    publisher = asyncio.create_task(publish_numbered())
    await halfway.wait()
    if fault == "kill":
        await asyncio.to_thread(server.kill)
        await asyncio.sleep(0.5)  # publishes fail meanwhile
        await asyncio.to_thread(server.start)
    else:
        await asyncio.to_thread(server.restart)
    await publisher
    for client in clients:
        await eventually(has_events(client, last_offset), progress(client, last_offset))
    for client in clients:
        assert_every_event_once_in_order(client, last_offset, total)
        assert client.of_type("resync") == []
    await wait_ready(session, *pods)
    for pod in pods:
        recovered = await wait_logged(pod, "broker_recovered")
        print(f"{fault}: {pod.env['EVA_WS_POD_ID']} deaf_s={[r['deaf_s'] for r in recovered]}")


async def test_redis_restart_without_persistence_sends_resync_and_clients_continue_in_the_new_epoch(
    redis_server: RedisServer, start_pods: PodFactory, session: aiohttp.ClientSession
) -> None:
    pods = start_pods(redis_server.url)
    clients = [await Client.connect(session, pod) for pod in pods]
    for client in clients:
        assert (await client.subscribe("C1"))["type"] == "subscribed"
    for seq in range(3):
        assert (await publish(session, pods[0], event_body("C1", seq)))[0] == 202
    for client in clients:
        await eventually(has_events(client, 3), "events before the restart were not delivered")
    old_epoch = clients[0].events()[0]["epoch"]

    await asyncio.to_thread(redis_server.restart)
    for client in clients:
        await eventually(has_resync(client), "no resync after the history was lost")
    resyncs = [client.of_type("resync")[0] for client in clients]
    for resync in resyncs:
        assert resync["subscription"] == "transactions:C1"
        assert resync["position"]["epoch"] != old_epoch
    new_epoch = resyncs[0]["position"]["epoch"]
    await wait_ready(session, *pods)

    for seq in range(3, 6):
        status, body = await publish(session, pods[1], event_body("C1", seq))
        assert status == 202
        assert body["epoch"] == new_epoch
    for client in clients:
        await eventually(has_events(client, 6), "events after the restart were not delivered")
        after = client.events()[3:]
        assert [e["epoch"] for e in after] == [new_epoch] * 3
        assert [e["offset"] for e in after] == [resyncs[0]["position"]["offset"] + n for n in (1, 2, 3)]
        assert [e["data"]["seq"] for e in after] == [3, 4, 5]
        resync_index = client.messages.index(client.of_type("resync")[0])
        assert client.messages.index(after[0]) > resync_index


async def test_resume_on_the_other_pod_has_no_gap_and_no_duplicate_and_too_old_is_unrecovered(
    redis_server: RedisServer, start_pods: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod_a, pod_b = start_pods(redis_server.url, history_size="10")
    raw = Redis.from_url(redis_server.url)
    try:
        # Small stream nodes, so the approximate MAXLEN trim really drops old events.
        await raw.config_set("stream-node-max-entries", 5)
    finally:
        await raw.aclose()
    first = await Client.connect(session, pod_a)
    assert (await first.subscribe("C1"))["type"] == "subscribed"
    for seq in range(3):
        assert (await publish(session, pod_b, event_body("C1", seq)))[0] == 202
    await eventually(lambda: len(first.events()) == 3, "first client did not get its events")
    seen = first.events()[-1]
    await first.close()
    for seq in range(3, 7):
        assert (await publish(session, pod_a, event_body("C1", seq)))[0] == 202

    resumed = await Client.connect(session, pod_b)
    ack = await resumed.subscribe("C1", since={"offset": seen["offset"], "epoch": seen["epoch"]})
    assert ack["type"] == "subscribed"
    assert ack["recovered"] is True
    assert ack["replayed"] == 4
    assert (await publish(session, pod_a, event_body("C1", 7)))[0] == 202
    await eventually(lambda: len(resumed.events()) >= 5, "missed and live events were not delivered")
    assert [e["offset"] for e in resumed.events()] == [4, 5, 6, 7, 8]
    assert [e["data"]["seq"] for e in resumed.events()] == [3, 4, 5, 6, 7]
    assert resumed.messages.index(ack) < resumed.messages.index(resumed.events()[0])

    for seq in range(8, 40):
        assert (await publish(session, pod_b, event_body("C1", seq)))[0] == 202
    too_old = await Client.connect(session, pod_a)
    ack = await too_old.subscribe("C1", since={"offset": seen["offset"], "epoch": seen["epoch"]})
    assert ack["type"] == "subscribed"
    assert ack["recovered"] is False
    # The history size is 10: the replay of what it holds starts after offset 30.
    assert ack["position"] == {"offset": 30, "epoch": seen["epoch"]}
    assert ack["replayed"] == 10
    assert (await publish(session, pod_b, event_body("C1", 40)))[0] == 202
    await eventually(lambda: len(too_old.events()) == 11, "no live event after an unrecovered resume")
    assert [e["offset"] for e in too_old.events()] == list(range(31, 42))


async def test_presence_lists_connections_of_every_pod_and_forgets_a_killed_pod_within_the_ttl(
    redis_server: RedisServer, start_pods: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod_a, pod_b = start_pods(redis_server.url)
    reader_token = token_for(SETTINGS, sub="ops", customers=["C1"])

    async def presence(pod: ServiceProcess) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {reader_token}"}
        async with session.get(f"{pod.url}/api/v1/presence/C1", headers=headers) as response:
            assert response.status == 200
            result: dict[str, Any] = await response.json()
            return result

    await Client.connect(session, pod_a, user="ua")
    await Client.connect(session, pod_b, user="ub")

    async def both_listed() -> bool:
        listed = await presence(pod_a)
        return sorted((c["userId"], c["podId"]) for c in listed["connections"]) == [
            ("ua", pod_a.env["EVA_WS_POD_ID"]),
            ("ub", pod_b.env["EVA_WS_POD_ID"]),
        ]

    await eventually(both_listed, "pod A does not list the connections of both pods")
    assert pod_b.proc is not None
    pod_b.proc.kill()  # kill -9: no chance to remove its entries
    pod_b.proc.wait()

    async def only_a() -> bool:
        listed = await presence(pod_a)
        return [c["podId"] for c in listed["connections"]] == [pod_a.env["EVA_WS_POD_ID"]] and listed["count"] == 1

    await eventually(only_a, "the killed pod's presence entries did not expire")


async def test_malformed_messages_published_into_a_channel_are_counted_and_never_reach_clients(
    redis_server: RedisServer, start_pods: PodFactory, session: aiohttp.ClientSession
) -> None:
    (pod,) = start_pods(redis_server.url, count=1)
    control = await Client.connect(session, pod)
    assert (await control.subscribe("C1"))["type"] == "subscribed"
    assert (await publish(session, pod, event_body("C1", 0)))[0] == 202
    await eventually(lambda: len(control.events()) == 1, "first event not delivered")
    epoch = control.events()[0]["epoch"]
    not_envelopes = [
        b'{"type":"transaction_new","data":{}}',
        b"e1:2:" + epoch.encode() + b"\n",
        b"e1:x:abc\n{}",
        b"\xff\xfe\x00binary",
        b"x" * 100_000,
    ]
    # A well-formed envelope of an unknown epoch: checked against history, never delivered.
    foreign = b'e1:2:foreign\n{"type":"unknown","data":{}}'
    raw = Redis.from_url(redis_server.url)
    try:
        for data in [*not_envelopes, foreign]:
            assert await raw.publish("transactions:C1", data) == 1
    finally:
        await raw.aclose()
    assert (await publish(session, pod, event_body("C1", 1)))[0] == 202
    await eventually(lambda: len(control.events()) == 2, "the valid event after the garbage was not delivered")
    assert [m["type"] for m in control.messages] == ["subscribed", "transaction_new", "transaction_new"]
    assert [e["offset"] for e in control.events()] == [1, 2]
    assert [e["data"]["seq"] for e in control.events()] == [0, 1]

    async def counted() -> bool:
        text = await metrics_text(session, pod)
        return metric_value(text, "eva_ws_broker_invalid_messages_total") == len(not_envelopes)

    await eventually(counted, "invalid messages were not counted")
    assert log_events(pod, "broker_invalid_message")
    assert (await readiness(session, pod))[0] == 200


async def test_readiness_fails_on_every_pod_while_redis_is_down_and_publishing_gets_503(
    redis_server: RedisServer, start_pods: PodFactory, session: aiohttp.ClientSession
) -> None:
    pods = start_pods(redis_server.url)
    await wait_ready(session, *pods)
    redis_server.kill()
    await wait_ready(session, *pods, ready=False)
    for pod in pods:
        status, body = await readiness(session, pod)
        assert status == 503
        assert set(body["reasons"]) <= {"broker_not_ready", "resubscribe_pending", "broker_canary_lag"}
        assert metric_value(await metrics_text(session, pod), "eva_ws_broker_ready") == 0
        status, body = await publish(session, pod, event_body("C1", 0))
        assert status == 503
        assert body["error"] == "unavailable"
        await wait_logged(pod, "broker_deaf")
    redis_server.start()
    await wait_ready(session, *pods)
    for pod in pods:
        assert metric_value(await metrics_text(session, pod), "eva_ws_broker_ready") == 1
        assert (await publish(session, pod, event_body("C1", 0)))[0] == 202
        await wait_logged(pod, "broker_recovered")


async def test_a_pod_starts_while_redis_is_down_and_becomes_ready_when_redis_appears(
    tmp_path: Path, start_pods: PodFactory, session: aiohttp.ClientSession
) -> None:
    server = RedisServer(tmp_path)  # not started yet
    (pod,) = start_pods(server.url, count=1)
    try:
        status, body = await readiness(session, pod)
        assert status == 503
        assert body["reasons"] == ["broker_not_ready"]
        assert metric_value(await metrics_text(session, pod), "eva_ws_broker_ready") == 0
        assert (await publish(session, pod, event_body("C1", 0)))[0] == 503
        # Connections work without Redis; presence and subscriptions degrade with clear answers.
        client = await Client.connect(session, pod)
        reply = await client.subscribe("C1")
        assert reply["type"] == "error"
        assert reply["code"] == "unavailable"
        text = await metrics_text(session, pod)
        assert metric_value(text, 'eva_ws_presence_unavailable_total{operation="add"}') >= 1
        assert log_events(pod, "presence_unavailable")

        server.start()
        await wait_ready(session, pod)
        assert (await client.subscribe("C1"))["type"] == "subscribed"
        assert (await publish(session, pod, event_body("C1", 0)))[0] == 202
        await eventually(lambda: len(client.events()) == 1, "no delivery once Redis appeared")
        assert log_events(pod, "broker_deaf")[0]["at_start"] is True
        await wait_logged(pod, "broker_recovered")
    finally:
        server.kill()


async def test_the_per_user_connection_cap_holds_across_pods(
    redis_server: RedisServer, start_pods: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod_a, pod_b = start_pods(redis_server.url, max_connections_per_user="2")
    token = token_for(SETTINGS, sub="capped", customers=["C1"])
    first = await session.ws_connect(f"{pod_a.url}/ws/transactions?token={token}")
    second = await session.ws_connect(f"{pod_b.url}/ws/transactions?token={token}")
    for pod in (pod_a, pod_b):
        async with session.get(f"{pod.url}/ws/transactions?token={token}") as refused:
            assert refused.status == 429
    await first.close()

    async def a_slot_is_free_again() -> bool:
        async with session.get(f"{pod_b.url}/ws/transactions?token={token}") as response:
            return response.status == 400  # past the cap: only the missing upgrade is refused now

    await eventually(a_slot_is_free_again, "closing a socket on pod A did not free a slot on pod B")
    await second.close()
