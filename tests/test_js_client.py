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
    result = subprocess.run(
        [node, "--test", "clients/js/test/"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout


def test_the_served_client_is_the_one_in_clients_js() -> None:
    served = ROOT / "service" / "static" / "eva-ws-client.js"
    assert (CLIENT_DIR / "eva-ws-client.js").resolve() == served.resolve()
