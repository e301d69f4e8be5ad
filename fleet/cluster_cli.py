"""`scripts/cluster up|down|status`: the cluster of fleet/cluster.py, kept running in the background."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Final

from fleet import ROOT
from fleet.cluster import Cluster
from fleet.nginx import http_get

DEFAULT_DIR: Final = ROOT / ".cache" / "cluster"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _state_file(directory: Path) -> Path:
    return directory / "state.json"


def _state(directory: Path) -> dict[str, Any] | None:
    if not _state_file(directory).exists():
        return None
    state: dict[str, Any] = json.loads(_state_file(directory).read_text())
    return state


def _up(directory: Path, workers: int, extra_env: dict[str, str]) -> int:
    state = _state(directory)
    if state and any(_alive(p["pid"]) for p in state["processes"]):
        print("a cluster is already running; `scripts/cluster down` first", file=sys.stderr)
        return 1
    # Only what an earlier `up` left here: --dir may name a directory with other files.
    for name in ("redis", "nginx", "workers"):
        shutil.rmtree(directory / name, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    env = {"mode": "development", "demo_publisher": "false", **extra_env}
    cluster = Cluster(directory, secret=secret, worker_env=env)
    cluster.start(workers, new_session=True)
    assert cluster.redis.process is not None
    assert cluster.nginx.process is not None
    processes = [{"name": "nginx", "pid": cluster.nginx.process.pid, "url": cluster.url}]
    for worker in cluster.workers:
        assert worker.process.proc is not None
        processes.append({"name": worker.pod_id, "pid": worker.process.proc.pid, "url": worker.url})
    processes.append({"name": "redis", "pid": cluster.redis.process.pid, "url": cluster.redis.url})
    state_file = _state_file(directory)
    state_file.unlink(missing_ok=True)
    state_file.touch(mode=0o600)  # it holds the signing secret
    state_file.write_text(json.dumps({"secret": secret, "url": cluster.url, "processes": processes}, indent=2))

    from service.auth import mint_token
    from service.config import load_settings

    settings = load_settings({"EVA_WS_JWT_SECRET": secret})
    token = mint_token(settings, sub="demo-user", customers=["CUST-001"], ttl_s=86_400)
    publisher = mint_token(settings, sub="demo-backend", customers=[], roles=["publisher"], ttl_s=86_400)
    ws = f"ws://127.0.0.1:{cluster.nginx.port}/ws/transactions"
    example = json.dumps(
        {"type": "transaction_new", "data": {"id": "TXN-1", "customerId": "CUST-001", "status": "pending"}},
        separators=(",", ":"),
    )
    print(
        f"""
  eva-ws cluster: nginx {cluster.url} -> {workers} workers, Redis {cluster.redis.url}

  Dashboard:  {cluster.url}/
  WebSocket:  {ws}?customerId=CUST-001&token={token}
  Dev token:  {token}   (user demo-user, customer CUST-001)
  Publisher:  {publisher}

    websocat "{ws}?customerId=CUST-001&token={token}"
    {{"type":"subscribe","channel":"transactions","filters":{{"customerId":"CUST-001"}}}}

    curl -X POST "{cluster.url}/api/v1/publish" -H "Authorization: Bearer {publisher}" \\
      -H 'Content-Type: application/json' \\
      -d '{example}'

  Where a customer lands: curl "{cluster.url}/readyz?customerId=CUST-001"
  Logs: {directory}/   Stop: scripts/cluster down
"""
    )
    return 0


def _down(directory: Path) -> int:
    state = _state(directory)
    if state is None:
        print("no cluster state; nothing to stop")
        return 0
    # Workers first (they drain), Redis last so the drain can still remove presence.
    order = sorted(state["processes"], key=lambda p: {"nginx": 0, "redis": 2}.get(p["name"], 1))
    for process in order:
        if _alive(process["pid"]):
            os.kill(process["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 30
    for process in order:
        while _alive(process["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(process["pid"]):
            os.kill(process["pid"], signal.SIGKILL)
        print(f"stopped {process['name']} (pid {process['pid']})")
    _state_file(directory).unlink()
    return 0


def _status(directory: Path) -> int:
    state = _state(directory)
    if state is None:
        print("no cluster (scripts/cluster up)")
        return 1
    healthy = True
    for process in state["processes"]:
        alive = _alive(process["pid"])
        detail = ""
        if alive and process["name"].startswith("worker"):
            try:
                status, _, body = http_get(f"{process['url']}/readyz")
                detail = f"readyz {status} {body.decode().strip()}"
            except OSError as error:
                detail = f"readyz unreachable ({error})"
        healthy = healthy and alive
        print(f"{process['name']:<10} pid {process['pid']:<8} {'up  ' if alive else 'DOWN'} {process['url']} {detail}")
    return 0 if healthy else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/cluster", description=__doc__)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state and logs (default .cache/cluster)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Redis, N workers and nginx in the background")
    up.add_argument("--workers", type=int, default=3)
    up.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra EVA_WS_ setting")
    sub.add_parser("down", help="stop everything `up` started")
    sub.add_parser("status", help="show the processes and their readiness")
    args = parser.parse_args(argv)
    if args.command == "up":
        extra = {}
        for item in args.env:
            name, _, value = item.partition("=")
            extra[name.removeprefix("EVA_WS_").lower()] = value
        return _up(args.dir.resolve(), args.workers, extra)
    if args.command == "down":
        return _down(args.dir.resolve())
    return _status(args.dir.resolve())


if __name__ == "__main__":
    sys.exit(main())
