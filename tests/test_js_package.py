"""clients/js as an npm package: what `npm pack` ships, and an application that installs the tarball."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Final

import pytest

from tests.service_process import ROOT, DevService

CLIENT_DIR: Final = ROOT / "clients" / "js"
CONSUMER_DIR: Final = Path(__file__).resolve().parent / "js_package"
SERVED_MODULE: Final = ROOT / "service" / "static" / "eva-ws-client.js"
# A guard against a hung tool, not a measurement.
TOOL_TIMEOUT_S: Final = 120


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is required for the package tests: apt-get install {package} (scripts/test does)"
    return path


def _run(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    # The command is named without its arguments, which may be tokens.
    assert result.returncode == 0, (
        f"{Path(args[0]).name} {args[1]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture
def npm_env(tmp_path: Path) -> dict[str, str]:
    """npm with its own cache and no registry traffic: everything here is local."""
    return {
        **os.environ,
        "npm_config_cache": str(tmp_path / "npm-cache"),
        "npm_config_offline": "true",
        "npm_config_audit": "false",
        "npm_config_fund": "false",
        "npm_config_update_notifier": "false",
    }


def _pack_listing(env: dict[str, str]) -> dict[str, Any]:
    npm = _tool("npm", "npm")
    result = _run(npm, "pack", "--dry-run", "--json", cwd=CLIENT_DIR, env=env)
    # Lifecycle scripts (prepack) print before the JSON document.
    listing: list[dict[str, Any]] = json.loads(result.stdout[result.stdout.index("[") :])
    return listing[0]


def test_npm_pack_ships_the_module_its_types_and_nothing_else(npm_env: dict[str, str]) -> None:
    listing = _pack_listing(npm_env)
    assert {f["path"] for f in listing["files"]} == {
        "package.json",
        "README.md",
        "dist/eva-ws-client.js",
        "eva-ws-client.d.ts",
    }
    # The packed module is the one the service serves, not a stale copy.
    assert (CLIENT_DIR / "dist" / "eva-ws-client.js").read_bytes() == SERVED_MODULE.read_bytes()
    manifest = json.loads((CLIENT_DIR / "package.json").read_text())
    assert listing["version"] == manifest["version"]
    shipped = {f["path"] for f in listing["files"]}
    entry = manifest["exports"]["."]
    for target in (entry["types"], entry["default"], manifest["types"], manifest["main"]):
        assert target.removeprefix("./") in shipped, target


@pytest.fixture
def installed(tmp_path: Path, npm_env: dict[str, str]) -> Path:
    """A new Node project with the packed client installed from its tarball, as a frontend team would."""
    npm = _tool("npm", "npm")
    packed = tmp_path / "packed"
    packed.mkdir()
    result = _run(npm, "pack", "--json", "--pack-destination", str(packed), cwd=CLIENT_DIR, env=npm_env)
    tarball = packed / json.loads(result.stdout[result.stdout.index("[") :])[0]["filename"]
    project = tmp_path / "app"
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": "app", "private": True, "type": "module"}))
    _run(npm, "install", str(tarball), cwd=project, env=npm_env)
    for name in ("consumer.mjs", "consumer.ts"):
        shutil.copy(CONSUMER_DIR / name, project / name)
    return project


def test_the_installed_package_delivers_events_from_a_real_service(
    installed: Path, tmp_path: Path, npm_env: dict[str, str]
) -> None:
    node = _tool("node", "nodejs")
    service = DevService(tmp_path)
    service.start()
    try:
        # Node 20 has WebSocket behind a flag; later versions have it by default.
        result = _run(
            node,
            "--experimental-websocket",
            "consumer.mjs",
            service.url,
            service.token(),
            service.publisher_token(),
            cwd=installed,
            env=npm_env,
        )
    finally:
        service.stop()
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"state": "open", "open": True, "type": "transaction_new", "id": "TXN-PKG-1"}


def test_the_installed_package_types_resolve_through_exports(installed: Path, npm_env: dict[str, str]) -> None:
    tsc = _tool("tsc", "node-typescript")
    _run(
        tsc,
        "--noEmit",
        "--strict",
        "--target",
        "es2022",
        "--lib",
        "es2022,dom",
        "--module",
        "node16",
        "--moduleResolution",
        "node16",
        "consumer.ts",
        cwd=installed,
        env=npm_env,
    )
