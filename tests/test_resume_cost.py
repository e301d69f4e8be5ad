"""A resume costs what it reads: Redis sends at most the history window, replayed events use up the rate limit,
and one user's sockets together read at most the user's resume budget."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from fleet.redis_server import RedisServer
from service import metrics
from service.broker.base import Position
from service.protocol import CloseCode
from service.resume_budget import ResumeBudgets, ResumeRefused
from tests.conftest import AppClient, connect, make_settings, publish, receive_json, token_for, txn, wait_closed
from tests.test_broker_redis import redis_factory

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD_BYTES = 1000
WINDOW = 100


def _sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def _bytes_sent(raw: Redis) -> int:
    stats = await raw.info("stats")
    return int(stats["total_net_output_bytes"])


async def test_a_resume_from_before_the_window_makes_redis_send_at_most_the_window(
    redis_server: RedisServer, raw: Redis
) -> None:
    # Large stream nodes: the approximate trim then leaves far more than the window behind.
    await raw.config_set("stream-node-max-entries", 1000)
    await raw.config_set("stream-node-max-bytes", 0)
    broker = redis_factory(redis_server, history_size=WINDOW)()
    await broker.start()
    try:
        channel = "transactions:C1"
        payload = orjson.dumps({"pad": "x" * PAYLOAD_BYTES})
        positions = await broker.publish_many([(channel, payload)] * 1900)
        epoch = positions[-1].epoch
        (stream,) = await raw.keys("*history:{transactions:C1}")
        assert await raw.xlen(stream) > 5 * WINDOW  # what a read without COUNT would send

        before = await _bytes_sent(raw)
        history = await broker.history(channel, Position(offset=1, epoch=epoch))
        sent = await _bytes_sent(raw) - before
    finally:
        await broker.close()
    # The window's payloads and their framing, one INFO reply and a few canaries; not the stream.
    assert sent < WINDOW * PAYLOAD_BYTES * 1.5
    assert not history.recovered
    assert [e.offset for e in history.envelopes] == list(range(1900 - WINDOW + 1, 1901))


async def test_replayed_events_count_against_the_rate_limit_and_a_resume_flood_is_closed_1008(
    app_client: AppClient,
) -> None:
    # Almost no refill, so only what is sent and replayed moves the bucket (burst 40).
    settings = make_settings(rate_limit_per_s="0.1", rate_limit_max_violations="3")
    client = await app_client(settings)
    events = [{"type": "transaction_new", "data": txn(f"T{i}")} for i in range(200)]
    response = await publish(client, settings, {"events": events})
    assert response.status == 202
    epoch = (await response.json())["events"][0]["epoch"]

    ws = await connect(client, token_for(settings))
    # The filter drops every event: reading them is still the cost (200 events = 8 messages).
    filters: dict[str, Any] = {"customerId": "C1", "transactionIds": ["none-of-these"]}
    resume = {
        "type": "subscribe",
        "channel": "transactions",
        "filters": filters,
        "since": {"offset": 0, "epoch": epoch},
    }
    unsubscribe = {"type": "unsubscribe", "channel": "transactions", "filters": filters}
    replies: list[dict[str, Any]] = []
    for _ in range(10):  # 20 messages: within the burst if a resume cost one message
        await ws.send_json(resume)
        replies.append(await receive_json(ws))
        if replies[-1]["type"] == "error":
            break
        assert replies[-1]["recovered"] is True
        assert replies[-1]["replayed"] == 0
        await ws.send_json(unsubscribe)
        assert (await receive_json(ws))["type"] == "unsubscribed"
    assert [r["type"] for r in replies] == ["subscribed"] * 4 + ["error"]
    assert replies[-1]["code"] == "rate_limited"

    for _ in range(3):
        await ws.send_json(resume)
    assert await wait_closed(ws) == CloseCode.POLICY_VIOLATION


async def _resume_until_refused(
    ws: aiohttp.ClientWebSocketResponse, resume: dict[str, Any], attempts: int
) -> list[dict[str, Any]]:
    """Resume, unsubscribe, resume again, `attempts` times; the replies to the resumes."""
    replies: list[dict[str, Any]] = []
    unsubscribe = {"type": "unsubscribe", "channel": resume["channel"], "filters": resume["filters"]}
    for n in range(attempts):
        await ws.send_json({**resume, "correlationId": f"resume-{n}"})
        reply = await receive_json(ws)
        replies.append(reply)
        if reply["type"] != "subscribed":
            continue
        for _ in range(reply["replayed"]):
            assert (await receive_json(ws))["type"] == "transaction_update"
        await ws.send_json(unsubscribe)
        assert (await receive_json(ws))["type"] == "unsubscribed"
    return replies


async def test_one_users_sockets_resuming_in_a_loop_make_redis_send_at_most_the_users_resume_budget(
    app_client: AppClient, redis_server: RedisServer, raw: Redis
) -> None:
    history = 100
    rate_per_s, burst = 1.0, 3 * history
    settings = make_settings(
        redis_url=redis_server.url,
        # The per-socket limit lets every resume through: only the user's budget can stop them.
        rate_limit_per_s="1000",
        rate_limit_burst="1000",
        resume_events_per_user_s=str(rate_per_s),
        resume_events_per_user_burst=str(burst),
    )
    client = await app_client(settings)
    pad = "x" * PAYLOAD_BYTES
    events = [{"type": "transaction_update", "data": txn(f"T{i}", note=pad)} for i in range(history)]
    response = await publish(client, settings, {"events": events})
    assert response.status == 202
    epoch = (await response.json())["events"][0]["epoch"]
    resume = {
        "type": "subscribe",
        "channel": "transactions",
        "filters": {"customerId": "C1"},
        "since": {"offset": 0, "epoch": epoch},
    }

    sockets = [await connect(client, token_for(settings, sub="mallory")) for _ in range(10)]
    refusals_before = _sample("eva_ws_resumes_total", outcome="refused")
    before = await _bytes_sent(raw)
    started = time.monotonic()
    replies = [r for rs in await asyncio.gather(*(_resume_until_refused(ws, resume, 3) for ws in sockets)) for r in rs]
    elapsed_s = time.monotonic() - started
    sent = await _bytes_sent(raw) - before

    resumed = [r for r in replies if r["type"] == "subscribed"]
    refused = [r for r in replies if r["type"] == "error"]
    assert all(r["recovered"] is True and r["replayed"] == history for r in resumed)
    # Each resume read the whole history; the last one admitted may overdraw the budget by one read.
    allowed = rate_per_s * elapsed_s + burst + history
    assert len(resumed) * history <= allowed < len(replies) * history
    assert sent < allowed * PAYLOAD_BYTES * 1.5  # Redis agrees: what it sent is that budget, not 30 histories
    # Refused with a reason and the request's correlationId, so the client retries it; never closed.
    assert refused
    assert {r["code"] for r in refused} == {"rate_limited"}
    assert all(r["correlationId"].startswith("resume-") and "retry in" in r["message"] for r in refused)
    assert _sample("eva_ws_resumes_total", outcome="refused") - refusals_before == len(refused)
    for ws in sockets:
        await ws.send_json({"type": "ping", "correlationId": "alive"})
        assert (await receive_json(ws))["type"] == "pong"

    # Another user's resume is not held up by the debt of the first.
    bystander = await connect(client, token_for(settings, sub="bystander"))
    (reply,) = await _resume_until_refused(bystander, resume, 1)
    assert reply["type"] == "subscribed"
    assert reply["replayed"] == history


async def test_a_resume_waits_for_its_users_budget_and_then_replays(app_client: AppClient) -> None:
    history = 100
    # One read fills the burst; the next one leaves the user 100 events (0.05 s) in debt.
    settings = make_settings(
        rate_limit_per_s="1000",
        rate_limit_burst="1000",
        resume_events_per_user_s="2000",
        resume_events_per_user_burst=str(history),
    )
    client = await app_client(settings)
    events = [{"type": "transaction_update", "data": txn(f"T{i}")} for i in range(history)]
    response = await publish(client, settings, {"events": events})
    epoch = (await response.json())["events"][0]["epoch"]
    resume = {
        "type": "subscribe",
        "channel": "transactions",
        "filters": {"customerId": "C1"},
        "since": {"offset": 0, "epoch": epoch},
    }
    sockets = [await connect(client, token_for(settings)) for _ in range(3)]
    waits_before = _sample("eva_ws_resume_budget_waits_total")
    replies = await asyncio.gather(*(_resume_until_refused(ws, resume, 3) for ws in sockets))
    assert [r["type"] for rs in replies for r in rs] == ["subscribed"] * 9
    assert _sample("eva_ws_resume_budget_waits_total") > waits_before
    assert {r["replayed"] for rs in replies for r in rs} == {history}


async def test_a_subscribe_refused_by_the_rate_limit_carries_its_correlation_id(app_client: AppClient) -> None:
    settings = make_settings(rate_limit_per_s="0.1", rate_limit_burst="1")
    client = await app_client(settings)
    ws = await connect(client, token_for(settings))
    await ws.send_json({"type": "ping", "correlationId": "p1"})
    assert (await receive_json(ws))["type"] == "pong"
    await ws.send_json(
        {"type": "subscribe", "channel": "transactions", "filters": {"customerId": "C1"}, "correlationId": "s1"}
    )
    refused = await receive_json(ws)
    # Without the id a client cannot tell which subscribe to ask for again, and never does.
    assert (refused["type"], refused["code"], refused["correlationId"]) == ("error", "rate_limited", "s1")


async def test_the_resume_budgets_forget_a_user_once_their_bucket_is_full_again() -> None:
    now = [0.0]
    budgets = ResumeBudgets(events_per_s=100.0, burst=100, clock=lambda: now[0])
    for user in ("a", "b", "c"):
        async with budgets.read(user) as charge:
            charge(50)
    async with budgets.read("d") as charge:
        charge(1000)  # ten seconds of debt
    assert len(budgets) == 4
    now[0] = 1.0  # a, b and c are full again; d is still 900 events in debt
    async with budgets.read("e"):
        assert len(budgets) == 2
    with pytest.raises(ResumeRefused):
        async with budgets.read("d"):
            pass
    now[0] = 11.0
    async with budgets.read("f"):
        assert len(budgets) == 1  # only the one reading


# The JavaScript client, on Node's own WebSocket: three snapshot subscriptions at once, then what it saw.
JS_SUBSCRIBER = """
import { EvaWsClient } from './clients/js/eva-ws-client.js';
const client = new EvaWsClient({ url: process.env.URL, token: process.env.TOKEN, pingIntervalMs: 0 });
const errors = [];
client.on('error', (detail) => errors.push(detail.code));
const subscribe = (customerId) => client.subscribe('transactions', { customerId }, { snapshot: true });
const subs = ['C1', 'C2', 'C3'].map(subscribe);
const ready = await Promise.all(subs.map((sub) => sub.ready));
console.log(JSON.stringify({ errors, snapshots: ready.map((r) => r.transactions.length) }));
client.close();
"""


async def test_the_js_client_refused_by_its_users_budget_asks_again_until_it_is_subscribed(
    app_client: AppClient,
) -> None:
    node = shutil.which("node")
    assert node is not None, "node (>= 20) is required for the JavaScript client tests: apt-get install nodejs"
    state = 100
    # Two snapshots of 100 transactions leave the user 5 s in debt: the third is refused at first.
    settings = make_settings(resume_events_per_user_s="20", resume_events_per_user_burst=str(state))
    client = await app_client(settings)
    for customer in ("C1", "C2", "C3"):
        events = [{"type": "transaction_new", "data": txn(f"{customer}-{i}", customer)} for i in range(state)]
        assert (await publish(client, settings, {"events": events})).status == 202

    url = str(client.make_url("/ws/transactions")).replace("http://", "ws://")
    env = {**os.environ, "URL": url, "TOKEN": token_for(settings, customers=["C1", "C2", "C3"])}
    flags = ["--experimental-websocket"] if await _node_needs_websocket_flag(node) else []
    process = await asyncio.create_subprocess_exec(
        node, *flags, "--input-type=module", "-e", JS_SUBSCRIBER, cwd=ROOT, env=env, stdout=PIPE, stderr=PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    seen = orjson.loads(stdout.splitlines()[-1])
    assert "rate_limited" in seen["errors"]
    assert seen["snapshots"] == [state] * 3


async def _node_needs_websocket_flag(node: str) -> bool:
    check = await asyncio.create_subprocess_exec(node, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)")
    return await check.wait() != 0
