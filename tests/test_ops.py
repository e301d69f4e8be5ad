"""Health, readiness, metrics, the separate ops port, CORS and the demo routes."""

from __future__ import annotations

import gc
import time

from aiohttp.test_utils import TestClient, TestServer

from fleet.waiting import eventually
from service.app import create_app
from service.ops import create_ops_app
from tests.conftest import connect, make_settings, metric_value, publish, receive_json, subscribe, token_for, txn


async def test_health_and_readiness(app_client):
    client = await app_client(make_settings())
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["pod"] == "pod-test"


async def test_metrics_count_connections_messages_errors_and_publishes(app_client):
    settings = make_settings()
    client = await app_client(settings)
    before = await (await client.get("/metrics")).text()
    ws = await connect(client, token_for(settings))
    await subscribe(ws)
    await ws.send_str("nope")
    await receive_json(ws)
    await publish(client, settings, {"type": "transaction_new", "data": txn()})
    await receive_json(ws)
    after = await (await client.get("/metrics")).text()

    def delta(name: str) -> float:
        return metric_value(after, name) - metric_value(before, name)

    assert delta("eva_ws_connections_active") == 1
    assert delta('eva_ws_messages_received_total{type="subscribe"}') == 1
    assert delta('eva_ws_errors_total{code="invalid_json"}') == 1
    assert delta('eva_ws_published_total{result="ok"}') == 1
    assert delta('eva_ws_messages_sent_total{type="subscribed"}') == 1
    assert "eva_ws_connection_duration_seconds_bucket" in after
    assert "eva_ws_delivery_lag_seconds_count" in after


async def test_metrics_show_a_blocked_event_loop_and_collector_pauses(app_client):
    client = await app_client(make_settings())
    before = await (await client.get("/metrics")).text()
    # The lag sampler is asleep for at most 0.1 s: blocking the loop for 0.4 s makes it wake
    # at least 0.3 s late, however slow the machine.
    time.sleep(0.4)  # blocking the loop is the point
    gc.collect()
    count = "eva_ws_event_loop_lag_seconds_count"
    within = 'eva_ws_event_loop_lag_seconds_bucket{le="0.25"}'

    async def late_sample_seen() -> bool:
        after = await (await client.get("/metrics")).text()
        return metric_value(after, count) - metric_value(before, count) > metric_value(after, within) - metric_value(
            before, within
        )

    await eventually(late_sample_seen, "a loop-lag sample above 0.25 s")
    after = await (await client.get("/metrics")).text()
    full = 'eva_ws_gc_pause_seconds_count{generation="2"}'
    assert metric_value(after, full) > metric_value(before, full)
    assert metric_value(after, "process_resident_memory_bytes") > 0
    assert metric_value(after, "process_cpu_seconds_total") > 0


async def test_ops_port_serves_probes_and_the_main_port_does_not(aiohttp_client):
    settings = make_settings(ops_port="9999")
    app = create_app(settings)
    main = await aiohttp_client(app)
    assert (await main.get("/metrics")).status == 404
    ops = TestClient(TestServer(create_ops_app(app)))
    await ops.start_server()
    try:
        assert (await ops.get("/readyz")).status == 200
        assert (await ops.get("/metrics")).status == 200
    finally:
        await ops.close()


async def test_cors_preflight_allows_configured_origin_only(app_client):
    client = await app_client(make_settings(cors_origins="https://admin.example.com"))
    headers = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "Authorization"}
    allowed = await client.options("/api/v1/publish", headers={"Origin": "https://admin.example.com", **headers})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://admin.example.com"
    denied = await client.options("/api/v1/publish", headers={"Origin": "https://evil.example", **headers})
    assert "Access-Control-Allow-Origin" not in denied.headers


async def test_dev_token_route_exists_only_in_development(app_client):
    production = await app_client(make_settings())
    assert (await production.get("/dev/token")).status == 404
    development = await app_client(make_settings(mode="development"))
    body = await (await development.get("/dev/token")).json()
    ws = await connect(development, body["token"])
    assert (await subscribe(ws, filters={"customerId": "CUST-001"}))["type"] == "subscribed"
    assert (await development.get("/")).status == 200
