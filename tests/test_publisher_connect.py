"""`Publisher.connect`: a backend publishes from Python with nothing but the Redis URL and prefix."""

from __future__ import annotations

import socket
from pathlib import Path
from textwrap import indent
from typing import Any

import pytest
from redis.asyncio import Redis

from fleet.redis_cluster import RedisCluster
from service import keys
from service.broker.base import BrokerUnavailable
from service.publisher import Publisher
from service.redis_keys import stream_key
from tests.conftest import AppClient, connect, receive_json, receive_type, subscribe, token_for, txn

ROOT = Path(__file__).resolve().parent.parent


async def test_an_event_published_with_only_the_redis_url_reaches_a_subscriber_of_a_pod(
    app_client: AppClient, redis_server
):
    client = await app_client(redis_url=redis_server.url)
    ws = await connect(client, token_for(client.app[keys.SETTINGS]))
    await subscribe(ws, filters={"customerId": "C1"})

    async with Publisher.connect(redis_server.url) as publisher:
        published = await publisher.publish("transaction_new", txn("T1", "C1"))

    event = await receive_type(ws, "transaction_new")
    assert event["correlationId"] == published.correlation_id
    assert event["data"]["id"] == "T1"


async def test_a_publisher_on_a_redis_cluster_reaches_a_subscriber_of_a_pod(app_client: AppClient, tmp_path: Path):
    cluster = RedisCluster(tmp_path)
    cluster.start()
    try:
        client = await app_client(redis_url=cluster.url)
        ws = await connect(client, token_for(client.app[keys.SETTINGS]))
        await subscribe(ws, filters={"customerId": "C1"})

        async with Publisher.connect(cluster.url) as publisher:
            published = await publisher.publish("transaction_new", txn("T1", "C1"))

        event = await receive_type(ws, "transaction_new")
        assert event["correlationId"] == published.correlation_id
    finally:
        cluster.stop()


async def test_the_prefix_selects_the_deployment_that_shares_the_redis(app_client: AppClient, redis_server):
    client = await app_client(redis_url=redis_server.url, redis_prefix="team-a:")
    ws = await connect(client, token_for(client.app[keys.SETTINGS]))
    await subscribe(ws, filters={"customerId": "C1"})

    async with Publisher.connect(redis_server.url, prefix="team-b:") as other:
        await other.publish("transaction_new", txn("T-other", "C1"))
    async with Publisher.connect(redis_server.url, prefix="team-a:") as publisher:
        await publisher.publish("transaction_new", txn("T-mine", "C1"))

    # Events of one channel arrive in order: had team-b's reached this pod, it would come first.
    event = await receive_type(ws, "transaction_new")
    assert event["data"]["id"] == "T-mine"


async def test_leaving_the_block_closes_every_connection_the_publisher_opened(redis_server, raw: Redis):
    async with Publisher.connect(redis_server.url) as publisher:
        await publisher.publish("transaction_new", txn())
        names = [c["name"] for c in await raw.client_list()]
        assert any(name.startswith("eva-ws:") for name in names), names
    names = [c["name"] for c in await raw.client_list()]
    assert not any(name.startswith("eva-ws:") for name in names), names


async def test_a_redis_that_is_not_there_makes_publish_raise_broker_unavailable():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    async with Publisher.connect(f"redis://127.0.0.1:{port}/0") as publisher:
        with pytest.raises(BrokerUnavailable):
            await publisher.publish("transaction_new", txn())


async def test_a_url_that_is_not_redis_is_refused_before_connecting():
    with pytest.raises(ValueError, match="redis://"):
        async with Publisher.connect("http://127.0.0.1:6379"):
            pass


async def test_history_settings_apply_to_the_history_the_publisher_appends_to(redis_server, raw: Redis):
    async with Publisher.connect(redis_server.url, history_ttl_s=60) as publisher:
        await publisher.publish("transaction_new", txn("T1", "C1"))
    assert 0 < await raw.ttl(stream_key("", "transactions:C1")) <= 60


def _python_example(document: str, after: str) -> str:
    """The first Python block of a document after a sentence, as a reader would copy it."""
    text = (ROOT / document).read_text()
    return text[text.index(after) :].split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize(
    ("document", "after"),
    [("README.md", "A backend in Python publishes"), ("docs/protocol.md", "From a Python backend service")],
)
async def test_the_documented_python_example_publishes_as_written(
    app_client: AppClient, redis_server, document: str, after: str
):
    client = await app_client(redis_url=redis_server.url)
    ws = await connect(client, token_for(client.app[keys.SETTINGS], customers=["CUST-001"]))
    await subscribe(ws, filters={"customerId": "CUST-001"})

    example = _python_example(document, after).replace("redis://redis:6379/0", redis_server.url)
    namespace: dict[str, Any] = {}
    exec(compile("async def example():\n" + indent(example, "    "), document, "exec"), namespace)
    await namespace["example"]()

    event = await receive_json(ws)
    assert (event["data"]["id"], event["data"]["customerId"]) == ("TXN-1", "CUST-001")
