"""Origins in headless Chromium: pages elsewhere importing the client, and refusals the dashboard explains."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Final

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.service_process import DevService
from tests.test_browser import CHROMIUM, launch, screenshot, txn_event, wait_in_page

CLIENT_PATH: Final = "/static/eva-ws-client.js"


class _BlankPage(BaseHTTPRequestHandler):
    """An application's own web server: one empty HTML page, on an origin of its own."""

    def do_GET(self) -> None:
        body = b"<!doctype html><title>an app on another origin</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class PageServer:
    """A second local HTTP server, so that a page has an origin other than the service's."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _BlankPage)
        self.thread = Thread(target=self.server.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> PageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium is required for the browser tests and was not found at {CHROMIUM}: run scripts/test")
    with sync_playwright() as playwright:
        instance = launch(playwright)
        yield instance
        instance.close()


@pytest.fixture
def new_page(browser: Browser) -> Iterator[Callable[[], Page]]:
    contexts = []

    def make() -> Page:
        context = browser.new_context(viewport={"width": 1280, "height": 720})
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def app_origin() -> Iterator[PageServer]:
    with PageServer() as server:
        yield server


@pytest.fixture
def foreign_origin() -> Iterator[PageServer]:
    with PageServer() as server:
        yield server


@pytest.fixture
def service(tmp_path: Path, app_origin: PageServer) -> Iterator[DevService]:
    """The service, allowing its own origin and the application's, not the foreign one."""
    process = DevService(tmp_path)
    process.env["EVA_WS_ALLOWED_ORIGINS"] = f"{process.url},{app_origin.origin}"
    process.start()
    yield process
    process.stop()


def _client_headers(service: DevService, origin: str) -> dict[str, str]:
    request = urllib.request.Request(f"{service.url}{CLIENT_PATH}", headers={"Origin": origin})
    with urllib.request.urlopen(request, timeout=10) as response:
        return {name.lower(): value for name, value in response.headers.items()}


# Imports the client from the service, as a page of another application would without a bundler.
IMPORT_AND_SUBSCRIBE: Final = """
async ({ service, token }) => {
  const { EvaWsClient } = await import(`${service}/static/eva-ws-client.js`);
  const client = new EvaWsClient({ url: `${service}/ws/transactions`, token, customerId: 'CUST-001' });
  window.received = new Promise((resolve) => client.on('event', ({ message }) => resolve(message.data.id)));
  await client.subscribe('transactions', { customerId: 'CUST-001' }).ready;
  return client.state;
}
"""


def test_a_page_on_an_allowed_origin_imports_the_client_from_the_service_and_receives_events(
    service: DevService, app_origin: PageServer, new_page: Callable[[], Page]
) -> None:
    page = new_page()
    page.goto(f"{app_origin.origin}/")
    state = page.evaluate(IMPORT_AND_SUBSCRIBE, {"service": service.url, "token": service.token()})
    assert state == "open"
    service.publish(txn_event("transaction_new", "TXN-X-1"), service.publisher_token())
    assert page.evaluate("() => window.received") == "TXN-X-1"

    headers = _client_headers(service, app_origin.origin)
    assert headers["access-control-allow-origin"] == app_origin.origin
    # Shared caches must keep the answer for one origin from reaching another.
    assert "origin" in headers["vary"].lower()


def test_a_page_on_a_foreign_origin_cannot_import_the_client(
    service: DevService, foreign_origin: PageServer, new_page: Callable[[], Page]
) -> None:
    page = new_page()
    page.goto(f"{foreign_origin.origin}/")
    failure = page.evaluate(
        "async (url) => { try { await import(url); return null; } catch (error) { return String(error); } }",
        f"{service.url}{CLIENT_PATH}",
    )
    assert failure is not None
    assert "Failed to fetch dynamically imported module" in failure
    assert "access-control-allow-origin" not in _client_headers(service, foreign_origin.origin)


# The presence dot of every listed user: [user or null, the dot's content, the dot's colour].
PRESENCE_DOTS: Final = """
() => [...document.querySelectorAll('#presence-list li')].map((li) => {
  const dot = getComputedStyle(li, '::before');
  return [li.dataset.user ?? null, dot.content, dot.color];
})
"""
GREEN: Final = "rgb(46, 158, 79)"


def _reason(page: Page, contains: str) -> str:
    wait_in_page(page, "(text) => document.querySelector('#reason').textContent.includes(text)", contains, contains)
    text: str = page.locator("#reason").inner_text()
    return text


def _green_dots(page: Page) -> list[list[str | None]]:
    dots: list[list[str | None]] = page.evaluate(PRESENCE_DOTS)
    return [dot for dot in dots if dot[1] != "none" and dot[2] == GREEN]


def test_dashboard_on_an_origin_the_service_refuses_says_so_and_shows_no_one_online(
    tmp_path: Path, new_page: Callable[[], Page]
) -> None:
    service = DevService(tmp_path)
    service.env["EVA_WS_ALLOWED_ORIGINS"] = "https://app.example.com"  # not the dashboard's own origin
    service.start()
    try:
        page = new_page()
        page.goto(f"{service.url}/")
        reason = _reason(page, "is not allowed")
        assert f"Refused by the server: origin {service.url} is not allowed" in reason
        assert page.locator("#status").get_attribute("data-state") in {"connecting", "reconnecting"}
        wait_in_page(page, "() => !document.querySelector('#presence-list').textContent.includes('…')", "presence")
        assert page.locator("#presence-list").inner_text() == "nobody"
        assert _green_dots(page) == []
        assert page.locator("#presence .offline").is_visible()
        screenshot(page, "dashboard-refused-origin")
    finally:
        service.stop()


def test_dashboard_with_a_rejected_token_says_the_token_was_rejected(
    service: DevService, new_page: Callable[[], Page]
) -> None:
    page = new_page()
    page.goto(f"{service.url}/#token={service.token(ttl_s=-3600)}")
    assert "Refused by the server: token rejected (token has expired)" in _reason(page, "token rejected")


def test_dashboard_shows_the_close_code_and_reason_and_greys_presence_when_the_server_closes(
    service: DevService, new_page: Callable[[], Page]
) -> None:
    page = new_page()
    page.goto(f"{service.url}/")
    wait_in_page(page, "() => document.querySelector('#status').textContent === 'connected'", "connected")
    # Presence is polled every few seconds: wait until this page's own user is listed, live.
    page.locator("#presence-list li[data-user='demo-user']").wait_for()
    assert page.locator("#reason").inner_text() == ""
    assert [dot[0] for dot in _green_dots(page)] == ["demo-user"]

    # Flooding the socket makes the server close it with 1008 and a reason.
    page.evaluate("() => { for (let i = 0; i < 300; i++) window.evaClient.send({ type: 'ping' }); }")
    reason = _reason(page, "Closed with code")
    assert reason == "Closed with code 1008 (policy violation): rate limit exceeded."
    assert page.locator("#status").get_attribute("data-state") == "closed"
    assert _green_dots(page) == []
    screenshot(page, "dashboard-closed-with-reason")
