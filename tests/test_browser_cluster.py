"""The browser client in real headless Chromium behind nginx: a worker dies or restarts, the client resumes elsewhere.

The page and the client module come from the cluster (nginx, then a worker), the socket goes through
nginx with ?customerId=, and a backend publishes a numbered stream through nginx the whole time. When
the customer's worker goes away the client must reconnect through nginx to another worker, resume
its subscription from Redis history (no resync) and hand the app every event exactly once, in order.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from playwright.sync_api import Page

from fleet.cluster import Cluster, Worker
from service.auth import mint_token
from tests import test_browser
from tests.cluster_testing import publisher_token
from tests.conftest import SECRET, make_settings
from tests.test_browser import HARNESS, events_seen, screenshot, wait_in_page, wait_until

# The browser fixtures of the single-process browser tests (one Chromium per module).
playwright = test_browser.playwright
browser = test_browser.browser
new_page = test_browser.new_page

WORKERS: Final = 3
CUSTOMER: Final = "CUST-042"
TRANSACTIONS: Final = 4  # the stream updates a few transactions in turn, so the dashboard stays readable


class Publisher(threading.Thread):
    """A backend posting one numbered event at a time through nginx until stopped.

    An event the service acknowledged (202) must reach the page exactly once. A publish that failed
    without an answer (the worker died with the request, a stale upstream connection) may or may
    not have been published: it is `uncertain` and may be seen at most once.
    """

    def __init__(self, cluster: Cluster, customer: str) -> None:
        super().__init__(name="publisher", daemon=True)
        self.url = f"{cluster.url}/api/v1/publish?customerId={customer}"
        self.customer = customer
        self.token = publisher_token()
        self.acked: list[str] = []
        self.uncertain: list[str] = []
        self._stop_event = threading.Event()

    def _publish(self, seq: int) -> str:
        correlation_id = f"seq-{seq:05d}"
        event = {
            # Not transaction_update: a client that falls behind (as during a replay) gets only the
            # newest queued update of a transaction, by design; stage changes are never conflated.
            "type": "stage_change",
            "correlationId": correlation_id,
            "data": {
                "id": f"TXN-{seq % TRANSACTIONS + 1}",
                "customerId": self.customer,
                "status": "pending",
                "stage": f"step-{seq}",
            },
        }
        request = urllib.request.Request(
            self.url,
            data=json.dumps(event).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                assert json.loads(response.read())["correlationId"] == correlation_id
                (self.acked if response.status == 202 else self.uncertain).append(correlation_id)
        except (urllib.error.URLError, OSError):
            self.uncertain.append(correlation_id)
        return correlation_id

    def run(self) -> None:
        seq = 0
        while not self._stop_event.is_set():
            seq += 1
            self._publish(seq)
            self._stop_event.wait(0.02)

    def wait_acked(self, page: Page, more: int) -> None:
        target = len(self.acked) + more
        wait_until(page, lambda: len(self.acked) >= target, f"{target} acknowledged publishes")

    def stop(self) -> None:
        self._stop_event.set()
        if self.ident is not None:
            self.join(timeout=30)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path / "cluster", secret=SECRET)
    cluster.start(WORKERS)
    yield cluster
    cluster.stop()


@pytest.fixture
def publisher(cluster: Cluster) -> Iterator[Publisher]:
    thread = Publisher(cluster, CUSTOMER)
    yield thread
    thread.stop()


def user_token(sub: str) -> str:
    return mint_token(make_settings(), sub=sub, customers=[CUSTOMER], ttl_s=3600)


def open_client(page: Page, cluster: Cluster) -> None:
    """The test harness of tests/test_browser.py on the cluster's origin, with tokens minted here."""
    page.goto(f"{cluster.url}/healthz")
    page.expose_function("mintToken", lambda reason: user_token("browser-user"))
    page.evaluate(HARNESS, {"customer": CUSTOMER, "mint": True})
    page.evaluate(
        """() => {
          window.closeCodes = [];
          window.client.on('state', (d) => d.state === 'reconnecting' && d.code && window.closeCodes.push(d.code));
        }"""
    )


def open_dashboard(page: Page, cluster: Cluster) -> None:
    """The dashboard served by the workers at / (through nginx), with a token in the fragment."""
    page.goto(f"{cluster.url}/#token={user_token('dashboard-user')}")
    wait_in_page(
        page,
        "() => window.evaClient && window.evaClient.state === 'open'"
        " && [...window.evaClient.wanted].every((sub) => sub.active)",
        "the dashboard's subscription",
    )


def worker(cluster: Cluster, pod_id: str | None) -> Worker:
    return next(w for w in cluster.workers if w.pod_id == pod_id)


def presence(cluster: Cluster) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        f"{cluster.url}/api/v1/presence/{CUSTOMER}?customerId={CUSTOMER}",
        headers={"Authorization": f"Bearer {user_token('ops')}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        connections: list[dict[str, Any]] = json.loads(response.read())["connections"]
        return connections


def assert_every_event_once_in_order(page: Page, publisher: Publisher) -> list[dict[str, Any]]:
    """Wait for every acknowledged event in the page, then compare the page's list with the stream."""

    def missing() -> list[str]:
        seen = {e["correlationId"] for e in events_seen(page)}
        return [c for c in publisher.acked if c not in seen]

    try:
        wait_until(page, lambda: not missing(), "every acknowledged event")
    except AssertionError:
        log = page.evaluate("() => ({ ...window.log, events: window.log.events.length })")
        raise AssertionError(
            f"{len(missing())} of {len(publisher.acked)} events missing: {missing()[:20]}; {log}"
        ) from None
    events = events_seen(page)
    seen = [e["correlationId"] for e in events]
    uncertain = set(publisher.uncertain)
    assert [c for c in seen if c not in uncertain] == publisher.acked, "every acknowledged event once, in order"
    assert len(seen) == len(set(seen)), "no event twice"
    assert len({e["epoch"] for e in events}) == 1, "one stream: Redis history outlives the workers"
    offsets = [e["offset"] for e in events]
    assert offsets == sorted(offsets)
    return events


def assert_dashboard_matches(dashboard: Page, events: list[dict[str, Any]]) -> None:
    wait_in_page(
        dashboard,
        "(count) => document.querySelector('#count').textContent === String(count)",
        f"the dashboard to count {len(events)} events",
        arg=len(events),
    )
    assert dashboard.locator("#rows tr[data-id]").count() == TRANSACTIONS


def test_client_resumes_on_another_worker_after_its_worker_is_killed(cluster, publisher, new_page):
    victim = worker(cluster, cluster.route(CUSTOMER))
    page = new_page()
    open_client(page, cluster)
    dashboard = new_page()
    open_dashboard(dashboard, cluster)
    assert [c["podId"] for c in presence(cluster) if c["userId"] == "browser-user"] == [victim.pod_id]

    publisher.start()
    wait_in_page(page, "() => window.log.events.length >= 20", "the first events")

    # Hold the reconnect until the stream has moved on, so the resume has events to replay.
    page.evaluate("() => { window.holdTokens = true; }")
    cluster.kill_worker(victim)
    wait_in_page(page, "() => typeof window.releaseTokens === 'function'", "the client to notice the dead worker")
    publisher.wait_acked(page, 20)
    page.evaluate("() => { window.holdTokens = false; window.releaseTokens(); }")
    wait_in_page(page, "() => window.log.reconnected.length === 1", "the reconnect")
    publisher.wait_acked(page, 20)
    wait_in_page(
        dashboard,
        "() => document.querySelector('#status').textContent.startsWith('connected: resumed')",
        "the dashboard's resume",
    )
    publisher.stop()

    events = assert_every_event_once_in_order(page, publisher)
    log = page.evaluate("() => window.log")
    assert log["resyncs"] == [], "resumed from Redis history, not resynced"
    assert len(log["resumed"]) == 1
    assert log["resumed"][0] >= 20, "the events published while the client was away were replayed"
    assert log["reconnected"] == [{"missed": log["resumed"][0], "resynced": 0}]
    assert log["sockets"] == 2
    assert log["tokenReasons"] == ["connect", "reconnect"]
    assert page.evaluate("() => window.closeCodes") == [1006], "a killed worker just drops its sockets"
    # The new socket lives on a surviving worker (the dead one's entries expire with its heartbeat).
    survivors = {w.pod_id for w in cluster.workers if w is not victim}
    pods = [c["podId"] for c in presence(cluster) if c["userId"] == "browser-user" and c["podId"] != victim.pod_id]
    assert len(pods) == 1, pods
    assert pods[0] in survivors

    assert_dashboard_matches(dashboard, events)
    screenshot(dashboard, "cluster-dashboard-after-kill")
    print(
        f"kill -9 of {victim.pod_id}: resumed on {pods[0]} replaying {log['resumed'][0]}; "
        f"{len(publisher.acked)} events acknowledged, {len(publisher.uncertain)} uncertain"
    )


def test_client_resumes_through_a_rolling_restart_of_every_worker(cluster, publisher, new_page):
    page = new_page()
    open_client(page, cluster)
    dashboard = new_page()
    open_dashboard(dashboard, cluster)
    publisher.start()
    wait_in_page(page, "() => window.log.events.length >= 10", "the first events")

    for each in cluster.workers:
        cluster.terminate_worker(each)  # drains: 503 to new upgrades, 1012 to its sockets, exits
        assert each.process.wait_exited() == 0
        cluster.restart_worker(each)
        wait_in_page(
            page,
            "() => window.client.state === 'open' && [...window.client.wanted].every((sub) => sub.active)",
            f"the client subscribed after restarting {each.pod_id}",
        )
        publisher.wait_acked(page, 10)
    publisher.stop()

    events = assert_every_event_once_in_order(page, publisher)
    log = page.evaluate("() => window.log")
    moves = len(log["reconnected"])
    assert moves >= 1, "the customer's worker was restarted: the client had to move"
    assert log["resyncs"] == []
    assert len(log["resumed"]) == moves
    assert all(r["resynced"] == 0 for r in log["reconnected"])
    assert log["sockets"] == moves + 1
    assert page.evaluate("() => window.closeCodes").count(1012) == moves, "each move began with a drain's 1012"
    assert [c["userId"] for c in presence(cluster)].count("browser-user") == 1

    assert_dashboard_matches(dashboard, events)
    screenshot(dashboard, "cluster-dashboard-after-rolling-restart")
    print(
        f"rolling restart: the client moved {moves} times; "
        f"{len(publisher.acked)} events acknowledged, {len(publisher.uncertain)} uncertain"
    )
