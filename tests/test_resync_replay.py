"""A subscriber told that its position is lost gets every event history still holds, from the position it is told."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from fleet.ports import free_port
from fleet.process import ServiceProcess
from fleet.redis_server import RedisServer
from fleet.waiting import eventually
from service.broker.base import Envelope, History, Position
from service.broker.memory import MemoryBroker
from service.hub import Hub
from tests.conftest import (
    SECRET,
    AppClient,
    connect,
    make_settings,
    receive_json,
    subscribe,
    token_for,
    txn,
)
from tests.conftest import publish as publish_api
from tests.drop_proxy import DropProxy
from tests.test_hub import Inbox, _publish, _settle, _subscribe
from tests.test_redis_functional import (
    Client,
    PodFactory,
    event_body,
    has_events,
    has_resync,
    progress,
    publish,
    session,
    start_pods,
    wait_ready,
)

__all__ = ["session", "start_pods"]  # fixtures


def _after(client: Client, message: dict[str, Any]) -> list[dict[str, Any]]:
    """The events the client got after one of its messages, in arrival order."""
    index = client.messages.index(message)
    return [m for m in client.messages[index + 1 :] if m in client.events()]


async def test_after_an_embedded_broker_restart_a_resume_gets_every_event_published_since(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    pod = ServiceProcess(tmp_path, jwt_secret=SECRET, drain_delay_s="0", drain_spread_s="0")
    try:
        pod.start()
        first = await Client.connect(session, pod)
        assert (await first.subscribe("C1"))["type"] == "subscribed"
        for seq in range(3):
            assert (await publish(session, pod, event_body("C1", seq)))[0] == 202
        await eventually(has_events(first, 3), "events before the restart were not delivered")
        seen = first.events()[-1]

        pod.kill()
        pod.start()
        # A new session: the old one's kept-alive connections died with the process.
        async with aiohttp.ClientSession() as after_restart:
            for seq in range(3, 23):
                assert (await publish(after_restart, pod, event_body("C1", seq)))[0] == 202
            resumed = await Client.connect(after_restart, pod)
            ack = await resumed.subscribe("C1", since={"offset": seen["offset"], "epoch": seen["epoch"]})
            assert ack["recovered"] is False
            new_epoch = ack["position"]["epoch"]
            assert new_epoch != seen["epoch"]
            # Nothing the new process published is lost: the replay starts before its first event.
            assert ack["position"]["offset"] == 0
            assert ack["replayed"] == 20
            await eventually(has_events(resumed, 20), progress(resumed, 20))
            events = _after(resumed, ack)
            assert [e["offset"] for e in events] == list(range(1, 21))
            assert [e["epoch"] for e in events] == [new_epoch] * 20
            assert [e["data"]["seq"] for e in events] == list(range(3, 23))
            await resumed.close()
    finally:
        pod.stop()


async def test_a_pod_that_finds_a_new_epoch_after_redis_lost_its_data_resyncs_and_replays_it(
    redis_server: RedisServer, start_pods: PodFactory, session: aiohttp.ClientSession
) -> None:
    # Pod B reaches Redis through a forwarder, so it can be kept away until pod A has published.
    with DropProxy(redis_server.port) as to_redis:
        (pod_a,) = start_pods(redis_server.url, count=1)
        (pod_b,) = start_pods(f"redis://127.0.0.1:{to_redis.port}/0", count=1)
        client = await Client.connect(session, pod_b)
        assert (await client.subscribe("C1"))["type"] == "subscribed"
        for seq in range(3):
            assert (await publish(session, pod_a, event_body("C1", seq)))[0] == 202
        await eventually(has_events(client, 3), "events before the Redis restart were not delivered")
        old_epoch = client.events()[-1]["epoch"]

        to_redis.target_port = free_port()  # nothing listens there: pod B cannot reconnect
        await asyncio.to_thread(redis_server.kill)  # kill -9, no persistence: every stream and offset is gone
        await asyncio.to_thread(redis_server.start)
        to_redis.cut()
        await wait_ready(session, pod_a)
        new_epoch = ""
        for seq in range(3, 23):
            status, body = await publish(session, pod_a, event_body("C1", seq))
            assert status == 202
            new_epoch = body["epoch"]
        assert new_epoch != old_epoch
        assert client.of_type("resync") == []

        to_redis.target_port = redis_server.port
        await eventually(has_resync(client), "pod B did not resync after finding a new epoch")
        resync = client.of_type("resync")[0]
        assert resync["subscription"] == "transactions:C1"
        assert resync["position"] == {"offset": 0, "epoch": new_epoch}
        await eventually(has_events(client, 23), progress(client, 23))
        events = _after(client, resync)
        assert [e["offset"] for e in events] == list(range(1, 21))
        assert [e["data"]["seq"] for e in events] == list(range(3, 23))
        assert client.of_type("resync") == [resync]

        # Live delivery goes on after the replay.
        await wait_ready(session, pod_b)
        assert (await publish(session, pod_a, event_body("C1", 23)))[0] == 202
        await eventually(has_events(client, 24), progress(client, 24))
        assert client.events()[-1]["offset"] == 21


async def test_a_replay_longer_than_the_send_queue_arrives_whole_instead_of_closing_4008(app_client: AppClient) -> None:
    settings = make_settings(send_queue_size="256", history_size="1000")
    client = await app_client(settings)
    events = [{"type": "transaction_new", "data": txn(f"T{i}")} for i in range(600)]
    response = await publish_api(client, settings, {"events": events})
    assert response.status == 202
    epoch = (await response.json())["events"][0]["epoch"]
    for since, recovered in (({"offset": 0, "epoch": epoch}, True), ({"offset": 5, "epoch": "lost-epoch"}, False)):
        ws = await connect(client, token_for(settings))
        ack = await subscribe(ws, filters={"customerId": "C1"}, since=since)
        assert ack["recovered"] is recovered
        assert ack["position"] == {"offset": 0, "epoch": epoch}
        assert ack["replayed"] == 600
        offsets = [(await receive_json(ws))["offset"] for _ in range(600)]
        assert offsets == list(range(1, 601))
        await ws.close()


class LaggingHistoryBroker(MemoryBroker):
    """The embedded broker, except that a held history read answers as of when it was asked,
    after events published meanwhile were delivered live: a Redis reply that crossed a publish."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: asyncio.Event | None = None
        self.held = asyncio.Event()

    async def history(self, channel: str, since: Position | None) -> History:
        answer = await super().history(channel, since)
        if self.hold is not None and since is not None:
            hold, self.hold = self.hold, None
            self.held.set()
            await hold.wait()
        return answer


async def test_an_event_that_arrives_live_while_a_repair_reads_older_history_is_still_delivered() -> None:
    broker = LaggingHistoryBroker()
    await broker.start()
    hub = Hub(broker)
    inbox = Inbox()
    await _subscribe(hub, inbox)
    await _publish(broker, 1)
    await _settle()
    gate = broker.hold = asyncio.Event()
    # An envelope of another epoch (a stale publisher) makes the hub check its history.
    hub.on_message(Envelope(channel="transactions:C1", offset=2, epoch="foreign", payload=b"{}"))
    await broker.held.wait()
    await _publish(broker, 1, start=1)  # delivered live while the read is under way
    gate.set()
    await _settle()
    assert inbox.offsets() == [1, 2]
