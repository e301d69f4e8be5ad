"""`scripts/cluster up|status|down`: a working cluster in the background, reachable with the printed token and
from a page on the printed URL, and nothing left running after `down`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import aiohttp
from playwright.sync_api import Page

from fleet import ROOT
from tests import test_browser
from tests.test_browser import wait_in_page

# The browser fixtures of the single-process browser tests (one Chromium per module).
playwright = test_browser.playwright
browser = test_browser.browser
new_page = test_browser.new_page


def _cli(directory, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVA_WS_")}
    return subprocess.run(
        [sys.executable, "-m", "fleet.cluster_cli", "--dir", str(directory), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_up_prints_a_working_url_and_token_and_down_leaves_nothing_running(tmp_path):
    directory = tmp_path / "cluster"
    up = _cli(directory, "up", "--workers", "2")
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((directory / "state.json").read_text())
        assert oct((directory / "state.json").stat().st_mode & 0o777) == "0o600"
        assert [p["name"] for p in state["processes"]] == ["nginx", "worker-1", "worker-2", "redis"]
        url = re.search(r"WebSocket:\s+(\S+)", up.stdout)
        assert url is not None, up.stdout
        origin = re.search(r"nginx (http://\S+)", up.stdout)
        assert origin is not None, up.stdout

        status = _cli(directory, "status")
        assert status.returncode == 0, status.stdout
        assert status.stdout.count('"status": "ready"') == 2

        async with aiohttp.ClientSession() as session, session.ws_connect(url.group(1)) as ws:
            await ws.send_json({"type": "subscribe", "channel": "transactions", "filters": {"customerId": "CUST-001"}})
            reply = await ws.receive_json(timeout=10)
            assert reply["type"] == "subscribed", reply
        # What a browser on the printed URL sends: its own origin.
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url.group(1), headers={"Origin": origin.group(1)}) as ws,
        ):
            await ws.send_json({"type": "subscribe", "channel": "transactions", "filters": {"customerId": "CUST-001"}})
            reply = await ws.receive_json(timeout=10)
            assert reply["type"] == "subscribed", reply
    finally:
        down = _cli(directory, "down")
    assert down.returncode == 0, down.stderr
    assert not [p for p in state["processes"] if _alive(p["pid"])]
    assert not (directory / "state.json").exists()
    assert _cli(directory, "status").returncode == 1


def test_the_dashboard_on_the_printed_url_connects_in_chromium(tmp_path, new_page):
    directory = tmp_path / "cluster"
    up = _cli(directory, "up", "--workers", "2")
    try:
        assert up.returncode == 0, up.stderr
        dashboard = re.search(r"Dashboard:\s+(\S+)", up.stdout)
        assert dashboard is not None, up.stdout
        page: Page = new_page()
        page.goto(dashboard.group(1))  # development mode: the page fetches its token from /dev/token
        wait_in_page(
            page,
            "() => window.evaClient && window.evaClient.state === 'open'"
            " && [...window.evaClient.wanted].every((sub) => sub.active)",
            "the dashboard's subscription through nginx",
        )
        assert page.locator("#status").text_content() == "connected"
    finally:
        down = _cli(directory, "down")
    assert down.returncode == 0, down.stderr
