"""The test client the cluster tests trust: it resumes after a restart close, stays away after 1000, and counts
duplicates and gaps instead of hiding them."""

from __future__ import annotations

import aiohttp

from fleet.redis_server import RedisServer
from fleet.resuming_client import ResumingClient
from fleet.waiting import eventually
from service import keys
from service.protocol import CloseCode
from tests.conftest import AppClient, make_settings, publish, token_for, txn


async def _started(session: aiohttp.ClientSession, url: str, token: str) -> ResumingClient:
    client = ResumingClient(
        session,
        url,
        token,
        routing_key="C1",
        subscriptions=[{"channel": "transactions", "filters": {"customerId": "C1"}}],
        base_backoff_s=0.05,
    )
    client.start()
    await eventually(client.subscribed.is_set, "the client subscribed")
    return client


async def test_it_resumes_after_a_restart_close_without_loss_and_stays_away_after_1000(app_client: AppClient):
    settings = make_settings()
    server = await app_client(settings)
    url = str(server.make_url("/ws/transactions"))
    async with aiohttp.ClientSession() as session:
        client = await _started(session, url, token_for(settings))
        for n in range(3):
            await publish(server, settings, {"type": "transaction_new", "data": txn(f"T{n}")})
        await eventually(lambda: len(client.events("transactions:C1")) == 3, "three live events")

        # The pod restarts: the client reconnects, resumes, and gets what was published meanwhile.
        for conn in list(server.app[keys.LIFECYCLE].connections):
            await conn.close(CloseCode.SERVICE_RESTART, "service restart")
        for n in range(3, 6):
            await publish(server, settings, {"type": "transaction_new", "data": txn(f"T{n}")})
        await eventually(lambda: client.connections == 2, "the client came back")
        await eventually(lambda: len(client.events("transactions:C1")) == 6, "all six events")
        assert client.close_codes[0] == 1012
        assert [e["data"]["id"] for e in client.events("transactions:C1")] == [f"T{n}" for n in range(6)]
        assert (client.duplicates, client.gaps, client.unrecovered) == (0, 0, 0)

        for conn in list(server.app[keys.LIFECYCLE].connections):
            await conn.close(CloseCode.NORMAL, "bye")
        await eventually(lambda: client.finished, "the client gave up after 1000")
        assert client.connections == 2
        await client.stop()


def test_offsets_that_repeat_or_skip_are_counted():
    client = ResumingClient(None, "ws://unused", "t", routing_key="C1", subscriptions=[])  # type: ignore[arg-type]
    for offset in (1, 2, 2, 5):
        client._on_event({"subscription": "transactions:C1", "offset": offset, "epoch": "e", "data": {"id": "x"}})
    assert client.duplicates == 1
    assert client.gaps == 2
    assert [e["offset"] for e in client.events("transactions:C1")] == [1, 2, 5]


async def test_two_subscriptions_on_one_channel_each_resume_from_their_own_position(app_client: AppClient):
    settings = make_settings()
    server = await app_client(settings)
    url = str(server.make_url("/ws/transactions"))
    async with aiohttp.ClientSession() as session:
        client = ResumingClient(
            session,
            url,
            token_for(settings, customers=["C1", "C2"]),
            routing_key="C1",
            subscriptions=[{"channel": "transactions", "filters": {"customerId": c}} for c in ("C1", "C2")],
            base_backoff_s=0.05,
        )
        client.start()
        await eventually(client.subscribed.is_set, "the client subscribed")
        # The two streams stand at different offsets: C1 at 2, C2 at 1.
        for transaction, customer in (("T-C1", "C1"), ("T-C1b", "C1"), ("T-C2", "C2")):
            await publish(server, settings, {"type": "transaction_new", "data": txn(transaction, customer)})
        await eventually(lambda: len(client.all_events()) == 3, "the live events of both customers")

        for conn in list(server.app[keys.LIFECYCLE].connections):
            await conn.close(CloseCode.SERVICE_RESTART, "service restart")
        await publish(server, settings, {"type": "transaction_new", "data": txn("T-late", "C2")})
        await eventually(lambda: client.connections == 2, "the client came back")
        await eventually(lambda: len(client.events("transactions:C2")) == 2, "the event published while away")
        assert [e["data"]["id"] for e in client.events("transactions:C2")] == ["T-C2", "T-late"]
        assert [e["data"]["id"] for e in client.events("transactions:C1")] == ["T-C1", "T-C1b"]
        assert (client.duplicates, client.gaps, client.unrecovered) == (0, 0, 0)
        await client.stop()


async def test_a_subscribe_refused_while_redis_is_down_is_asked_again(app_client: AppClient, redis_server: RedisServer):
    settings = make_settings(redis_url=redis_server.url, redis_reconnect_max_s="0.2")
    server = await app_client(settings)
    url = str(server.make_url("/ws/transactions"))
    redis_server.kill()
    async with aiohttp.ClientSession() as session:
        client = ResumingClient(
            session,
            url,
            token_for(settings),
            routing_key="C1",
            subscriptions=[{"channel": "transactions", "filters": {"customerId": "C1"}}],
            base_backoff_s=0.05,
        )
        client.start()
        await eventually(lambda: any(e.get("code") == "unavailable" for e in client.errors), "a refused subscribe")
        redis_server.start()
        await eventually(client.subscribed.is_set, "subscribed on the same socket once Redis is back")
        await publish(server, settings, {"type": "transaction_new", "data": txn("T1")})
        await eventually(lambda: client.event_ids("transactions:C1") == {"T1"}, "the event after the retry")
        assert client.connections == 1
        await client.stop()
