"""Command line: `eva-ws serve` runs a pod, `eva-ws token` mints a development token."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from service.config import ConfigError, Settings, load_settings
from service.log import configure_logging, get_logger


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eva-ws", description="Real-time transaction events over WebSocket.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run one pod (settings from EVA_WS_* environment variables)")
    token = commands.add_parser("token", help="print a signed token for development and tests")
    token.add_argument("--sub", required=True, help="user id (the sub claim)")
    token.add_argument("--customer", action="append", default=[], help="a customer the user may see (repeatable)")
    token.add_argument("--role", action="append", default=[], help="a role: admin, publisher (repeatable)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    return parser


def _run(settings: Settings) -> None:
    from service.server import serve

    try:
        import uvloop
    except ImportError:  # uvloop is optional on platforms without a wheel
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"eva-ws: configuration error: {error}", file=sys.stderr)
        if args.command == "serve":
            # Log collectors read stdout: say it there too, as every other pod event.
            configure_logging("error")
            get_logger("eva_ws").error("config_invalid", error=str(error))
        return 2
    if args.command == "token":
        from service.auth import mint_token

        if settings.jwt_algorithms[0].startswith("HS") and not (
            os.environ.get("EVA_WS_JWT_SECRET") or os.environ.get("EVA_WS_JWT_SECRET_FILE")
        ):
            print("eva-ws: set EVA_WS_JWT_SECRET to the secret the server uses (scripts/run does)", file=sys.stderr)
            return 2
        if args.ttl <= 0:
            print("eva-ws: --ttl must be positive", file=sys.stderr)
            return 2
        try:
            print(mint_token(settings, sub=args.sub, customers=args.customer, roles=args.role, ttl_s=args.ttl))
        except ConfigError as error:
            print(f"eva-ws: {error}", file=sys.stderr)
            return 2
        return 0
    configure_logging(settings.log_level, pod_id=settings.pod_id)
    get_logger("eva_ws").debug("settings_loaded", pod_id=settings.pod_id)
    _run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
