"""The browser client's unit tests (Node's built-in runner) run as part of the suite."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DIR = ROOT / "clients" / "js"


def test_js_client_unit_tests_pass_under_node() -> None:
    node = shutil.which("node")
    assert node is not None, "node (>= 20) is required for the JavaScript client tests: apt-get install nodejs"
    # Node 20 has its WebSocket (the one a refused handshake is tested with) behind a flag.
    has_websocket = subprocess.run(
        [node, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"], capture_output=True, check=False
    )
    flags = [] if has_websocket.returncode == 0 else ["--experimental-websocket"]
    result = subprocess.run(
        [node, *flags, "--test", "clients/js/test/"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout


def test_the_served_client_is_the_one_in_clients_js() -> None:
    served = ROOT / "service" / "static" / "eva-ws-client.js"
    assert (CLIENT_DIR / "eva-ws-client.js").resolve() == served.resolve()
