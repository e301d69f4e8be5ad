"""What `scripts/run` tells a new user before the server starts: the settings in effect, and commands that work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from service.config import ENV_PREFIX
from tests.conftest import SECRET

ROOT = Path(__file__).resolve().parent.parent
BANNER = ROOT / "scripts" / "lib" / "dev_banner.sh"


def _banner(**settings: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update({ENV_PREFIX + k.upper(): v for k, v in settings.items()})
    result = subprocess.run(
        ["bash", "-c", f'source "{BANNER}" && dev_banner http://127.0.0.1:9000 USER-TOKEN PUBLISHER-TOKEN'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return result.stdout


def test_the_banner_names_the_redis_broker_without_its_password():
    banner = _banner(mode="development", redis_url="redis://:hunter2@localhost:6379/0")
    assert "(development mode, Redis broker from EVA_WS_REDIS_URL, demo traffic on)" in banner
    assert "embedded" not in banner
    assert "hunter2" not in banner


def test_the_banner_names_the_embedded_broker_without_redis():
    assert "(development mode, embedded broker, demo traffic on)" in _banner(mode="development")


@pytest.mark.parametrize(("settings", "demo"), [({"demo_publisher": "False"}, "off"), ({"mode": "production"}, "off")])
def test_the_banner_says_when_there_is_no_demo_traffic(settings: dict[str, str], demo: str):
    assert f"demo traffic {demo})" in _banner(**settings)


def test_the_banner_says_how_to_change_the_port():
    assert "EVA_WS_PORT=9000" in _banner(mode="development")


def test_the_banners_token_command_mints_with_the_checkouts_secret(tmp_path: Path):
    (tmp_path / ".eva-ws-dev.env").write_text(f"EVA_WS_JWT_SECRET={SECRET}\n")
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    command = next(line.strip() for line in _banner(mode="development").splitlines() if "eva-ws token" in line)
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    result = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])["customerId"] == "CUST-001"
