"""presence_join / presence_leave on the embedded broker: delivered to who asked, not made for nobody."""

from __future__ import annotations

from typing import Any

from tests.conftest import connect, make_settings, metric_value, receive_type, subscribe, token_for

PUBLISHED = 'eva_ws_presence_announcements_total{outcome="published"}'


async def published(client: Any) -> float:
    async with client.get("/metrics") as response:
        return metric_value(await response.text(), PUBLISHED)


async def test_only_sockets_of_a_watched_customer_are_announced_on_the_embedded_broker(app_client: Any) -> None:
    settings = make_settings()
    client = await app_client(settings)
    before = await published(client)
    unwatched = await connect(client, token_for(settings, sub="nobody-watches", customers=["C2"]))
    await unwatched.close()

    watcher = await connect(client, token_for(settings, sub="watcher", customers=["C1"]))
    ack = await subscribe(watcher, filters={"customerId": "C1"}, presence=True)
    assert ack["presence"] is True
    visitor = await connect(client, token_for(settings, sub="visitor", customers=["C1", "C2"]))
    joined = await receive_type(watcher, "presence_join")
    assert (joined["userId"], joined["customerId"], joined["podId"]) == ("visitor", "C1", settings.pod_id)
    await visitor.close()
    left = await receive_type(watcher, "presence_leave")
    assert left["connId"] == joined["connId"]
    # The visitor's join and leave for C1; nothing for C2, which nobody here watches.
    assert await published(client) - before == 2

    # Once the last watcher is gone, the pod stops announcing C1 too.
    await watcher.send_json({"type": "unsubscribe", "channel": "transactions", "filters": {"customerId": "C1"}})
    await receive_type(watcher, "unsubscribed")
    late = await connect(client, token_for(settings, sub="late", customers=["C1"]))
    await late.close()
    await watcher.send_json({"type": "ping"})
    await receive_type(watcher, "pong")
    assert await published(client) - before == 2
    await watcher.close()
