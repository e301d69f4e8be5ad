"""The dashboard, the JavaScript client and the specification's example client in real headless Chromium."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from playwright.sync_api import Browser, Page, Playwright, WebSocket, sync_playwright

from tests.certificates import self_signed
from tests.drop_proxy import DropProxy
from tests.protocol_schemas import assert_server_message
from tests.service_process import ROOT, DevService

CHROMIUM: Final = os.environ.get("EVA_WS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS: Final = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS: Final = ROOT / "build" / "screenshots"
SPEC_EXAMPLE: Final = ROOT / "clients" / "js" / "examples" / "spec-example.js"
# Generous: a loaded CI machine may be slow, and nothing here measures speed.
DEADLINE_S: Final = 20.0


def wait_until(page: Page, check: Callable[[], Any], what: str, timeout_s: float = DEADLINE_S) -> Any:
    """Poll a condition observed from Python while the page keeps running; fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        page.wait_for_timeout(50)


def wait_in_page(page: Page, expression: str, what: str, arg: Any = None) -> Any:
    try:
        return page.wait_for_function(expression, arg=arg, timeout=DEADLINE_S * 1000).json_value()
    except Exception as error:
        raise AssertionError(f"timed out waiting for {what}: {error}") from None


def txn_event(kind: str, txn_id: str, customer: str = "CUST-001", **fields: Any) -> dict[str, Any]:
    data = {"id": txn_id, "customerId": customer, "status": "pending", "stage": "created", **fields}
    return {"type": kind, "data": data}


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"Chromium is required for the browser tests and was not found at {CHROMIUM}: "
            "install it with `apt-get install chromium chromium-driver` (scripts/test does) "
            "or point EVA_WS_CHROMIUM at a Chromium binary"
        )
    with sync_playwright() as instance:
        yield instance


def launch(playwright: Playwright, *extra_args: str) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args])


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    instance = launch(playwright)
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service-logs")


@pytest.fixture
def service(logs: Path) -> Iterator[DevService]:
    process = DevService(logs)
    process.start()
    yield process
    process.stop()


@pytest.fixture
def new_page(browser: Browser) -> Iterator[Callable[[], Page]]:
    contexts = []

    def make() -> Page:
        context = browser.new_context(viewport={"width": 1280, "height": 720})
        contexts.append(context)
        page = context.new_page()
        page.on("websocket", _validate_frames)
        return page

    yield make
    for context in contexts:
        context.close()


def _validate_frames(ws: WebSocket) -> None:
    """Every server frame a browser receives must match docs/schemas."""

    def check(payload: str | bytes) -> None:
        assert_server_message(json.loads(payload))

    ws.on("framereceived", check)


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# A test page on the service's origin that runs the client and records what it reports.
HARNESS: Final = """
async ({ customer, mint, pingIntervalMs = 30000, pongTimeoutMs = 10000 }) => {
  const { EvaWsClient } = await import('/static/eva-ws-client.js');
  const log = window.log = { events: [], states: [], resyncs: [], reconnected: [], resumed: [], errors: [],
                             tokenReasons: [], refreshed: [], sockets: 0 };
  const client = window.client = new EvaWsClient({
    url: '/ws/transactions', customerId: customer, initialDelayMs: 200, maxDelayMs: 1000, pingIntervalMs, pongTimeoutMs,
    token: async ({ reason }) => {
      log.tokenReasons.push(reason);
      if (window.holdTokens) await new Promise((resolve) => { window.releaseTokens = resolve; });
      if (mint) return window.mintToken(reason);
      return (await (await fetch('/dev/token')).json()).token;
    },
  });
  client.on('state', (d) => { log.states.push(d.state); if (d.state === 'open') log.sockets += 1; });
  client.on('resync', (d) => log.resyncs.push(d.reason));
  client.on('resumed', (d) => log.resumed.push(d.replayed));
  client.on('reconnected', (d) => log.reconnected.push(d));
  client.on('error', (d) => log.errors.push(d.code));
  client.on('tokenrefreshed', (d) => log.refreshed.push(d.expiresAt));
  const sub = client.subscribe('transactions', { customerId: customer }, {
    onEvent: (m) => log.events.push({ id: m.data.id, offset: m.offset, epoch: m.epoch,
                                      correlationId: m.correlationId }),
  });
  await sub.ready;
}
"""


def open_harness(page: Page, service: DevService, *, customer: str = "CUST-001", mint: bool = False) -> None:
    page.goto(f"{service.url}/healthz")
    page.evaluate(HARNESS, {"customer": customer, "mint": mint})


def events_seen(page: Page) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = page.evaluate("() => window.log.events")
    return events


def test_dashboard_shows_published_transactions_in_place_with_presence_and_filter(service, new_page):
    publisher = service.publisher_token()
    page = new_page()
    page.goto(f"{service.url}/")
    wait_in_page(page, "() => document.querySelector('#status').textContent === 'connected'", "connected")

    other = new_page()  # another user of the same customer
    other.goto(f"{service.url}/#token={service.token(sub='alice', customers=['CUST-001'])}")
    wait_in_page(other, "() => document.querySelector('#status').textContent === 'connected'", "alice connected")

    service.publish(txn_event("transaction_new", "TXN-1001", amount="250.00 EUR", updatedBy="alice"), publisher)
    service.publish(txn_event("transaction_new", "TXN-1002", "CUST-002", amount="80.00 EUR"), publisher)
    service.publish(txn_event("transaction_new", "TXN-1003", amount="1,200.00 EUR", updatedBy="bob"), publisher)
    row = page.locator("tr[data-id='TXN-1001']")
    row.wait_for(timeout=DEADLINE_S * 1000)
    assert "pending" in row.inner_text()

    service.publish(
        txn_event("stage_change", "TXN-1001", status="approved", stage="settlement", updatedBy="alice"), publisher
    )
    service.publish(txn_event("transaction_update", "TXN-1003", status="failed", stage="kyc"), publisher)
    wait_in_page(
        page,
        "() => document.querySelector(\"tr[data-id='TXN-1001']\").innerText.includes('settlement')",
        "TXN-1001 updated in place",
    )
    assert page.locator("tr[data-id='TXN-1001']").count() == 1
    assert "approved" in row.inner_text()
    assert "250.00 EUR" in row.inner_text(), "a partial update keeps the fields it does not carry"
    wait_in_page(page, "() => document.querySelectorAll('#rows tr[data-id]').length === 3", "three rows")
    # Alice's page sees only her customer.
    other.locator("tr[data-id='TXN-1003']").wait_for(timeout=DEADLINE_S * 1000)
    assert other.locator("tr[data-id='TXN-1002']").count() == 0

    wait_in_page(
        page, "() => document.querySelector('#presence-list li[data-user=alice]') !== null", "alice in presence"
    )
    assert page.locator("#presence-list li[data-user='demo-user']").count() == 1
    shot = screenshot(page, "dashboard")

    page.fill("#filter-ids", "TXN-1003")
    page.click("#filter button")
    service.publish(txn_event("transaction_update", "TXN-1001", status="settled"), publisher)
    service.publish(txn_event("transaction_update", "TXN-1003", status="retrying", stage="kyc"), publisher)
    wait_in_page(
        page, "() => document.querySelector(\"tr[data-id='TXN-1003']\").innerText.includes('retrying')", "filtered"
    )
    assert page.locator("tr[data-id='TXN-1001']").is_hidden()
    assert "settled" not in page.locator("tr[data-id='TXN-1001']").inner_text(), "filtered out on the server"
    screenshot(page, "dashboard-filtered")
    assert shot.stat().st_size > 0


def test_dashboard_shows_the_current_transactions_at_first_paint_then_their_changes(service, new_page):
    publisher = service.publisher_token()
    service.publish(txn_event("transaction_new", "TXN-2001", amount="10.00 EUR", version=1), publisher)
    service.publish(txn_event("transaction_update", "TXN-2001", status="approved", version=2), publisher)
    service.publish(txn_event("transaction_update", "TXN-2001", status="stale", version=1), publisher)
    service.publish(txn_event("transaction_new", "TXN-2002", version=1), publisher)
    service.publish(txn_event("transaction_new", "TXN-2003", version=1), publisher)
    service.publish(txn_event("transaction_delete", "TXN-2003", version=2), publisher)

    page = new_page()
    page.goto(f"{service.url}/")
    # No event is published after the page opened: the rows come from the snapshot alone.
    wait_in_page(page, "() => document.querySelectorAll('#rows tr[data-id]').length === 2", "two current rows")
    assert "approved" in page.locator("tr[data-id='TXN-2001']").inner_text(), "the newest version, not the stale one"
    assert page.locator("tr[data-id='TXN-2003']").count() == 0
    assert page.locator("#empty").count() == 0
    assert page.locator("#count").inner_text() == "0"
    screenshot(page, "dashboard-first-paint")

    service.publish(txn_event("transaction_update", "TXN-2002", status="settled", version=2), publisher)
    wait_in_page(
        page, "() => document.querySelector(\"tr[data-id='TXN-2002']\").innerText.includes('settled')", "a change"
    )
    assert page.locator("#count").inner_text() == "1"


def test_client_resumes_after_a_dropped_connection_with_each_event_once(logs, new_page):
    service = DevService(logs)
    with DropProxy(service.port) as proxy:
        # The browser reaches the service only through the proxy, so the test can cut the network.
        service.env["EVA_WS_ALLOWED_ORIGINS"] = f"http://127.0.0.1:{proxy.port}"
        service.start()
        try:
            publisher = service.publisher_token()
            page = new_page()
            page.goto(f"http://127.0.0.1:{proxy.port}/healthz")
            page.evaluate(HARNESS, {"customer": "CUST-001", "mint": False})
            sent = [
                service.publish(txn_event("transaction_new", f"T{i}"), publisher)["correlationId"] for i in range(2)
            ]
            wait_in_page(page, "() => window.log.events.length >= 2", "the first two events")

            # Drop the connection and hold the reconnect while more events are published.
            page.evaluate("() => { window.holdTokens = true; }")
            proxy.cut()
            wait_in_page(page, "() => typeof window.releaseTokens === 'function'", "the client to wait for a token")
            for i in range(3):
                sent.append(service.publish(txn_event("transaction_update", f"T{i}"), publisher)["correlationId"])
            page.evaluate("() => { window.holdTokens = false; window.releaseTokens(); }")
            wait_in_page(page, "() => window.log.reconnected.length === 1", "the reconnect")

            sent.append(service.publish(txn_event("transaction_update", "T9"), publisher)["correlationId"])
            wait_in_page(page, "() => window.log.events.length >= 6", "all six events")
            log = page.evaluate("() => window.log")
            assert [e["correlationId"] for e in log["events"]] == sent, "every event once, in order"
            assert log["reconnected"] == [{"missed": 3, "resynced": 0}]
            assert log["resumed"] == [3]
            assert log["resyncs"] == []
            assert log["tokenReasons"] == ["connect", "reconnect"]
        finally:
            service.stop()


def test_client_replaces_a_silently_dead_connection_and_resumes(logs, new_page):
    service = DevService(logs)
    with DropProxy(service.port) as proxy:
        service.env["EVA_WS_ALLOWED_ORIGINS"] = f"http://127.0.0.1:{proxy.port}"
        service.start()
        try:
            publisher = service.publisher_token()
            page = new_page()
            page.goto(f"http://127.0.0.1:{proxy.port}/healthz")
            # Tokens come from the test, not over HTTP: the frozen proxy would also hang pooled HTTP connections.
            page.expose_function("mintToken", lambda reason: service.token(customers=["CUST-001"]))
            options = {"customer": "CUST-001", "mint": True, "pingIntervalMs": 300, "pongTimeoutMs": 1000}
            page.evaluate(HARNESS, options)
            sent = [service.publish(txn_event("transaction_new", "D1"), publisher)["correlationId"]]
            wait_in_page(page, "() => window.log.events.length >= 1", "the first event")

            # The connection stays open but nothing passes: no close event will ever come.
            proxy.freeze()
            sent.append(service.publish(txn_event("transaction_update", "D1"), publisher)["correlationId"])
            wait_in_page(page, "() => window.log.reconnected.length === 1", "a new connection after missed pongs")
            wait_in_page(page, "() => window.log.events.length >= 2", "the event sent into the dead connection")
            log = page.evaluate("() => window.log")
            assert [e["correlationId"] for e in log["events"]] == sent
            assert log["reconnected"] == [{"missed": 1, "resynced": 0}]
        finally:
            service.stop()


def test_client_and_dashboard_survive_a_server_restart(service, new_page):
    publisher = service.publisher_token()
    page = new_page()
    open_harness(page, service)
    dashboard = new_page()
    dashboard.goto(f"{service.url}/")
    wait_in_page(dashboard, "() => document.querySelector('#status').textContent === 'connected'", "connected")
    before = [service.publish(txn_event("transaction_new", f"R{i}"), publisher)["correlationId"] for i in range(3)]
    wait_in_page(page, "() => window.log.events.length >= 3", "events before the restart")

    service.restart()  # SIGTERM: drain with 1012, exit; then a new process with a new in-process broker
    wait_in_page(page, "() => window.log.reconnected.length === 1", "the reconnect")
    wait_in_page(
        dashboard,
        "() => document.querySelector('#status').textContent.startsWith('connected: resynced')",
        "the dashboard's resync notice",
    )
    after = [service.publish(txn_event("transaction_update", f"R{i}"), publisher)["correlationId"] for i in range(3)]
    wait_in_page(page, "() => window.log.events.length >= 6", "events after the restart")
    dashboard.locator("tr[data-id='R2']").wait_for(timeout=DEADLINE_S * 1000)
    screenshot(dashboard, "dashboard-after-restart")

    log = page.evaluate("() => window.log")
    assert [e["correlationId"] for e in log["events"]] == before + after
    assert log["resyncs"] == ["not_recovered"], "the new epoch is surfaced so the app refetches"
    assert log["reconnected"] == [{"missed": 0, "resynced": 1}]
    assert len({e["epoch"] for e in log["events"]}) == 2
    assert "reconnecting" in log["states"]


def test_client_refreshes_an_expiring_token_without_reconnecting(logs, new_page):
    service = DevService(logs, token_refresh_grace_s="3")
    service.start()
    try:
        page = new_page()
        page.goto(f"{service.url}/healthz")
        page.expose_function("mintToken", lambda reason: service.token(customers=["CUST-001"], ttl_s=2))
        page.evaluate(HARNESS, {"customer": "CUST-001", "mint": True})
        wait_in_page(page, "() => window.log.refreshed.length >= 2", "two token refreshes")
        publisher = service.publisher_token()
        sent = service.publish(txn_event("transaction_new", "X1"), publisher)["correlationId"]
        wait_in_page(page, "() => window.log.events.length >= 1", "an event after the refreshes")
        log = page.evaluate("() => window.log")
        assert [e["correlationId"] for e in log["events"]] == [sent]
        assert log["sockets"] == 1, "refreshing must not cost a reconnect"
        assert log["tokenReasons"][:3] == ["connect", "expiring", "expiring"]
    finally:
        service.stop()


def test_client_reconnects_with_a_fresh_token_after_the_server_closes_with_4001(logs, new_page):
    service = DevService(logs, token_refresh_grace_s="1")
    service.start()
    try:
        page = new_page()
        page.goto(f"{service.url}/healthz")

        def mint(reason: str) -> str:
            if reason == "expiring":
                raise RuntimeError("the identity provider is down")
            return service.token(customers=["CUST-001"], ttl_s=2 if reason == "connect" else 3600)

        page.expose_function("mintToken", mint)
        page.evaluate(HARNESS, {"customer": "CUST-001", "mint": True})
        publisher = service.publisher_token()
        first = service.publish(txn_event("transaction_new", "Y1"), publisher)["correlationId"]
        wait_in_page(page, "() => window.log.reconnected.length === 1", "a reconnect after 4001")
        second = service.publish(txn_event("transaction_update", "Y1"), publisher)["correlationId"]
        wait_in_page(page, "() => window.log.events.length >= 2", "both events")
        log = page.evaluate("() => window.log")
        assert [e["correlationId"] for e in log["events"]] == [first, second]
        assert "expired" in log["tokenReasons"]
        assert log["resyncs"] == []
    finally:
        service.stop()


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the host the specification's example connects to."""
    return self_signed(tmp_path, "api.eva-platform.com")


def test_the_specifications_example_client_receives_an_event_verbatim(playwright, logs, tls_files):
    """The example runs unchanged: the browser resolves api.eva-platform.com to the test server."""
    cert, key = tls_files
    service = DevService(logs, tls_cert=str(cert), tls_key=str(key), allowed_origins="https://api.eva-platform.com")
    service.start()
    browser = launch(playwright, f"--host-resolver-rules=MAP api.eva-platform.com 127.0.0.1:{service.port}")
    try:
        context = browser.new_context(ignore_https_errors=True)
        page = context.new_page()
        frames: list[dict[str, Any]] = []

        def on_socket(ws: WebSocket) -> None:
            ws.on("framereceived", lambda payload: frames.append(json.loads(payload)))

        page.on("websocket", on_socket)
        page.goto("https://api.eva-platform.com/healthz")
        page.add_script_tag(content=f"const authToken = {json.dumps(service.token())};")
        page.add_script_tag(content=SPEC_EXAMPLE.read_text())
        wait_until(page, lambda: any(f["type"] == "subscribed" for f in frames), "the subscription ack")
        published = service.publish(txn_event("transaction_new", "TXN-SPEC"), service.publisher_token())
        event = wait_until(page, lambda: next((f for f in frames if f["type"] == "transaction_new"), None), "the event")
        for frame in frames:
            assert_server_message(frame)
        assert event["data"]["id"] == "TXN-SPEC"
        assert event["correlationId"] == published["correlationId"]
        assert frames[0]["subscription"] == "transactions:CUST-001"
    finally:
        browser.close()
        service.stop()


# Opens a socket, sends what `burst` names once it is open, and records the close event.
SEND_UNTIL_CLOSED: Final = """
async ({ burst }) => {
  const { token } = await (await fetch('/dev/token')).json();
  const ws = new WebSocket(`ws://${location.host}/ws/transactions?token=${token}`);
  window.socketClose = null;
  ws.onclose = (event) => { window.socketClose = { code: event.code, wasClean: event.wasClean }; };
  await new Promise((resolve) => { ws.onopen = resolve; });
  if (burst === 'oversized') {
    ws.send('x'.repeat(8 * 1024 * 1024));
  } else {
    const subscribe = { type: 'subscribe', channel: 'transactions', filters: { customerId: 'CUST-001' } };
    for (let i = 0; i < 2000; i++) ws.send(JSON.stringify(subscribe));
    // Then 12 MiB more, still being written when the server closes.
    const padding = ' '.repeat(32 * 1024);
    for (let i = 0; i < 384; i++) ws.send(padding);
  }
}
"""


def close_after(page: Page, service: DevService, burst: str) -> dict[str, Any]:
    page.goto(f"{service.url}/healthz")
    page.evaluate(SEND_UNTIL_CLOSED, {"burst": burst})
    closed: dict[str, Any] = wait_in_page(page, "() => window.socketClose", "the socket to close")
    return closed


@pytest.mark.parametrize(("burst", "code"), [("oversized", 1009), ("subscribe", 1008)])
def test_a_browser_still_sending_gets_the_close_code_not_a_reset(service, new_page, burst, code):
    # The server reads and drops what the browser still sends after its close frame, so no
    # TCP reset destroys the frame: Chromium reports the code, where it used to report 1006.
    page = new_page()
    for attempt in range(10):
        assert close_after(page, service, burst)["code"] == code, f"attempt {attempt}"
