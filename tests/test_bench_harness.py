"""The benchmark harness measures consistently: a tiny run against eva-ws and the raw reference.

No timing is asserted: only that what was published, delivered and counted adds up, that
CPU time was seen, and that every process the harness started is gone afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FANOUT_SUBSCRIBERS = 10
CHANNEL_CLIENTS, CHANNEL_CUSTOMERS = 20, 5
STORM_CLIENTS = 30
IDLE_CLIENTS = 40
INGEST_CHANNELS, INGEST_CLIENTS = 20, 10


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    knobs = [
        f"fanout.subscribers={FANOUT_SUBSCRIBERS}",
        "fanout.start_rate=50",
        "fanout.max_steps=2",
        "fanout.step_s=0.5",
        f"channels.clients={CHANNEL_CLIENTS}",
        f"channels.customers={CHANNEL_CUSTOMERS}",
        "channels.start_rate=50",
        "channels.max_steps=1",
        "channels.step_s=1.0",
        f"storm.clients={STORM_CLIENTS}",
        f"idle.clients={IDLE_CLIENTS}",
        f"ingest.channels={INGEST_CHANNELS}",
        f"ingest.clients={INGEST_CLIENTS}",
        # Enough events that the server's CPU time, read from /proc in 10 ms ticks, cannot stay 0.
        "ingest.start_rate=2000",
        "ingest.max_steps=1",
        "ingest.step_s=1.0",
        "publish.duration_s=0.5",
        "publish.runs=1",
    ]
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--size=tiny",
        "--targets=eva-ws,raw-aiohttp",
        "--scenarios=fanout,channels,storm,idle,ingest,publish",
        # The project's virtualenv has aiohttp but not the benchmark's faster client.
        "--client=aiohttp",
        "--loadgen-processes=1",
        # Consistency does not depend on a quiet machine; do not wait for one.
        "--quiet-wait-s=0",
        "--nice=0",
        f"--json={out / 'results.json'}",
        f"--log-dir={out / 'logs'}",
        "--no-report",
        *(f"--set={k}" for k in knobs),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVA_WS_")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    return data


@pytest.fixture(params=["eva-ws", "raw-aiohttp"])
def target(request: pytest.FixtureRequest, results: dict[str, Any]) -> dict[str, Any]:
    t: dict[str, Any] = results["targets"][request.param]
    assert "error" not in t, t.get("error")
    return t


def test_fanout_delivers_every_event_once_to_every_subscriber(target: dict[str, Any]) -> None:
    r = target["scenarios"]["fanout"]
    assert "error" not in r, r.get("error")
    sent = sum(s["sent"] for s in r["steps"])
    assert sent > 0
    assert r["expected"] == sent * FANOUT_SUBSCRIBERS
    assert r["unique"] == r["expected"] == r["delivered_sum"]
    assert r["lost"] == 0
    assert r["dups"] == 0
    assert all(s["delivered"] == s["sent"] * FANOUT_SUBSCRIBERS for s in r["steps"])


def test_fanout_latencies_are_ordered_and_cpu_time_is_seen(target: dict[str, Any]) -> None:
    r = target["scenarios"]["fanout"]
    for s in r["steps"]:
        assert 0 < s["p50_ms"] <= s["p99_ms"] <= s["p999_ms"] <= s["max_ms"]
    channels = target["scenarios"]["channels"]
    assert r["server_cpu_s"] + channels["server_cpu_s"] > 0


def test_many_channels_deliver_each_event_only_to_its_customer(target: dict[str, Any]) -> None:
    r = target["scenarios"]["channels"]
    assert "error" not in r, r.get("error")
    sent = sum(s["sent"] for s in r["steps"])
    # Events go round-robin over customers, so each reaches clients/customers subscribers.
    assert sent % CHANNEL_CUSTOMERS == 0
    assert r["expected"] == sent * CHANNEL_CLIENTS // CHANNEL_CUSTOMERS
    assert r["unique"] == r["expected"]
    assert (r["lost"], r["dups"]) == (0, 0)


def test_connect_storm_and_idle_connections_all_subscribe(target: dict[str, Any]) -> None:
    storm, idle = target["scenarios"]["storm"], target["scenarios"]["idle"]
    assert (storm["ok"], storm["failed"]) == (STORM_CLIENTS, 0)
    assert storm["handshakes_per_s"] > 0
    assert idle["clients"] == IDLE_CLIENTS
    assert idle["rss_after_mb"] > 0


def test_every_started_server_is_stopped(target: dict[str, Any]) -> None:
    assert target["ports"]
    for port in target["ports"]:
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))


def test_ingest_delivers_each_event_to_its_channels_one_subscriber(target: dict[str, Any]) -> None:
    r = target["scenarios"]["ingest"]
    assert "error" not in r, r.get("error")
    sent = sum(s["sent"] for s in r["steps"])
    # Round-robin over every channel; only the first INGEST_CLIENTS channels have a subscriber.
    assert sent % INGEST_CHANNELS == 0
    assert r["expected"] == sent * INGEST_CLIENTS // INGEST_CHANNELS
    assert r["unique"] == r["expected"]
    assert (r["lost"], r["dups"]) == (0, 0)
    assert r["server_cpu_s"] > 0
    assert all(s["published_per_s"] > 0 for s in r["steps"])


@pytest.mark.parametrize("scenario", ["channels", "ingest"])
def test_pipelined_messages_are_ones_the_eva_ws_pod_takes_without_repair(target: dict[str, Any], scenario: str) -> None:
    r = target["scenarios"][scenario]
    if not target["description"].startswith("eva-ws"):
        assert r["publisher_wire"] == "bare"
        return
    assert r["publisher_wire"] == "envelope"
    # Each pre-encoded envelope was the next offset of its channel: nothing repaired, resynced or dropped.
    assert all(set(s["server_counters"].values()) == {0} for s in r["steps"])
    if scenario == "ingest":
        assert set(r["pod_counters"].values()) == {0}


def test_publish_counts_every_event_redis_accepted_through_both_ways(target: dict[str, Any]) -> None:
    r = target["scenarios"]["publish"]
    assert "error" not in r, r.get("error")
    if "skipped" in r:
        assert not target["description"].startswith("eva-ws")
        assert "eva-ws only" in r["skipped"]
        return
    assert {run["via"] for run in r["runs"]} == {"http", "library"}
    for run in r["runs"]:
        assert run["events"] > 0
        assert not run["errors"]
        assert run["duplicates"] == 0
        assert run["events_per_core_s"] > 0
        assert run["redis_cpu_s"] >= 0
    # Every event carried its own idempotency key, so each accepted one took exactly one offset.
    assert r["offsets_total"] == r["events"]
