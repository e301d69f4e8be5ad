"""eva-ws in development mode as a real process, with what browser tests need: tokens and publishing."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Final

from fleet.process import ServiceProcess
from service.auth import mint_token
from service.config import Settings, load_settings
from tests.conftest import SECRET

ROOT: Final = Path(__file__).resolve().parent.parent
DEV_CUSTOMERS: Final = ["CUST-001", "CUST-002", "CUST-003"]


class DevService(ServiceProcess):
    """Development mode (the dashboard, /dev/token); a restart keeps the port.

    A restart does not wait for a load balancer that is not there: the drain closes the
    sockets with 1012 at once.
    """

    def __init__(self, tmp_path: Path, **env: str) -> None:
        env = {"mode": "development", "drain_delay_s": "0", "drain_spread_s": "0", **env}
        super().__init__(tmp_path, jwt_secret=SECRET, **env)
        self.env.setdefault("EVA_WS_ALLOWED_ORIGINS", self.url)

    @property
    def settings(self) -> Settings:
        return load_settings({k: v for k, v in self.env.items() if k.startswith("EVA_WS_")})

    def restart(self) -> None:
        self.stop()
        self.start()

    def token(self, sub: str = "demo-user", customers: list[str] | None = None, ttl_s: int = 3600) -> str:
        return mint_token(
            self.settings, sub=sub, customers=DEV_CUSTOMERS if customers is None else customers, ttl_s=ttl_s
        )

    def publisher_token(self) -> str:
        """Minted by the `eva-ws token` command, as a backend operator would."""
        result = subprocess.run(
            [sys.executable, "-m", "service", "token", "--sub", "backend", "--role", "publisher"],
            cwd=ROOT,
            env=self.env,  # the environment without the caller's EVA_WS_* variables
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.strip()

    def publish(self, event: dict[str, Any], token: str) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}/api/v1/publish",
            data=json.dumps(event).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        context = None
        if self.scheme == "https":
            # The test certificate names the public host; the test reaches it at 127.0.0.1.
            context = ssl.create_default_context(cafile=self.env["EVA_WS_TLS_CERT"])
            context.check_hostname = False
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            assert response.status == 202, response.status
            result: dict[str, Any] = json.loads(response.read())
            return result
