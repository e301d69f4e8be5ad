"""Command line: `eva-ws serve` runs a pod, `token` mints a dev token, `disconnect` and `revoke` act on a deployment."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Final

import structlog

from service.config import ENV_PREFIX, ConfigError, Settings, load_settings
from service.log import configure_logging, get_logger
from service.protocol import ID_PATTERN, is_valid_id

# Where `scripts/run` keeps the development secret; `eva-ws token` needs the same one.
DEV_SECRET_HINT: Final = (
    "scripts/run keeps its secret in .eva-ws-dev.env at the checkout's root: "
    "load it with `set -a; . ./.eva-ws-dev.env; set +a`"
)
SERVE_EPILOG: Final = f"""\
Every setting is an {ENV_PREFIX}* environment variable; the main ones:
  {ENV_PREFIX}MODE             production (default) or development (a dev secret, the demo page and traffic)
  {ENV_PREFIX}HOST             listen address (default 0.0.0.0); --host overrides it
  {ENV_PREFIX}PORT             WebSocket and HTTP API port (default 8080); --port overrides it
  {ENV_PREFIX}OPS_PORT         a separate port for /healthz, /readyz and /metrics (default: the main port)
  {ENV_PREFIX}REDIS_URL        redis://host:6379/0 to share events with other pods (default: embedded broker)
  {ENV_PREFIX}REDIS_PREFIX     prepended to every Redis key, so deployments can share a Redis
  {ENV_PREFIX}JWT_SECRET       HMAC secret of the tokens, at least 32 bytes (or {ENV_PREFIX}JWT_SECRET_FILE)
  {ENV_PREFIX}JWT_ALGORITHMS   allowed algorithms (default HS256); RS*/ES*/EdDSA need {ENV_PREFIX}JWT_PUBLIC_KEY
  {ENV_PREFIX}ALLOWED_ORIGINS  browser origins allowed to open sockets (https://app.example.com,...)
  {ENV_PREFIX}LOG_LEVEL        debug, info (default), warning, error
Every setting, with its default: docs/configuration.md"""
# `eva-ws disconnect` and `eva-ws revoke`: where the deployment is, and an admin token for it.
CONTROL_URL_ENV: Final = ENV_PREFIX + "URL"
ADMIN_TOKEN_ENV: Final = ENV_PREFIX + "ADMIN_TOKEN"
CONTROL_TIMEOUT_S: Final = 10.0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not between 0 and 65535")
    return port


def _id(text: str) -> str:
    # The server's own rule for user and customer ids: a token breaking it is refused at the handshake.
    if not is_valid_id(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid id: it must match {ID_PATTERN.pattern}")
    return text


def _positive_seconds(text: str) -> int:
    try:
        seconds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return seconds


def _unix_seconds(text: str) -> int:
    if text == "now":
        return int(time.time())
    try:
        seconds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not `now` or whole unix seconds") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return seconds


def _version() -> str:
    try:
        return metadata.version("eva-ws")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    from service.auth import ROLE_ADMIN, ROLE_PUBLISHER

    parser = argparse.ArgumentParser(prog="eva-ws", description="Real-time transaction events over WebSocket.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run one pod (settings from EVA_WS_* environment variables)",
        description="Run one pod until SIGTERM or Ctrl-C, then drain its connections and stop.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", help=f"listen address (overrides {ENV_PREFIX}HOST)")
    serve.add_argument("--port", type=_port, help=f"listen port (overrides {ENV_PREFIX}PORT)")
    token = commands.add_parser(
        "token",
        help="print a signed token for development and tests",
        description="Print a token signed with the server's key, after checking the server would accept it.",
        epilog=f"It reads the server's {ENV_PREFIX}* settings, {ENV_PREFIX}JWT_SECRET above all.\n{DEV_SECRET_HINT}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    token.add_argument("--sub", required=True, type=_id, help="user id (the sub claim)")
    token.add_argument(
        "--customer", action="append", default=[], type=_id, help="a customer the user may see (repeatable)"
    )
    token.add_argument(
        "--role",
        action="append",
        default=[],
        choices=(ROLE_ADMIN, ROLE_PUBLISHER),
        help="admin (sees every customer) or publisher (may publish); repeatable",
    )
    token.add_argument("--ttl", type=_positive_seconds, default=3600, help="lifetime in seconds (default 3600)")

    control_epilog = (
        f"It calls the deployment's HTTP API with a token of role admin: --url or {CONTROL_URL_ENV}, "
        f"--token or {ADMIN_TOKEN_ENV}. Every pod applies the command within a second."
    )
    disconnect = commands.add_parser(
        "disconnect",
        help="close every socket of a user on every pod (close code 4003)",
        description="Close every socket of a user on every pod of a running deployment, with close code 4003.",
        epilog=control_epilog,
    )
    disconnect.add_argument("--user", required=True, type=_id, help="user id (the sub claim)")
    disconnect.add_argument("--reason", help="the close reason the clients see (at most 100 bytes)")
    revoke = commands.add_parser(
        "revoke",
        help="refuse a user's tokens issued before a time, or one token by its jti, on every pod",
        description="Refuse tokens on every pod of a running deployment (401 token_revoked) and close the "
        "sockets opened with them (4003). Revocations outlive pod restarts.",
        epilog=control_epilog,
    )
    revoke.add_argument("--user", type=_id, help="user id (the sub claim); needs --before")
    revoke.add_argument("--before", type=_unix_seconds, help="revoke tokens issued before this (unix seconds, or now)")
    revoke.add_argument("--jti", help="revoke the one token with this jti claim")
    for command in (disconnect, revoke):
        command.add_argument("--url", help=f"the deployment's base URL, https://ws.example.com ({CONTROL_URL_ENV})")
        command.add_argument("--token", help=f"a token with the admin role ({ADMIN_TOKEN_ENV})")
    return parser


def _refuse(command: str, event: str, message: str, *, exit_code: int) -> int:
    """Say once why the command stops: on stderr, and as a JSON event when stdout goes to a log collector."""
    print(f"eva-ws: {message}", file=sys.stderr)
    if command == "serve" and not sys.stdout.isatty():
        # Collectors read the pod's stdout as JSON; on a terminal the line above says it all.
        if not structlog.is_configured():
            configure_logging("error")
        get_logger("eva_ws").error(event, error=message)
    return exit_code


def _environment(args: argparse.Namespace) -> Mapping[str, str]:
    env = dict(os.environ)
    if getattr(args, "host", None) is not None:
        env[ENV_PREFIX + "HOST"] = args.host
    if getattr(args, "port", None) is not None:
        env[ENV_PREFIX + "PORT"] = str(args.port)
    return env


def _token(settings: Settings, args: argparse.Namespace) -> int:
    from service.auth import AuthError, TokenVerifier, mint_token

    if settings.jwt_algorithms[0].startswith("HS") and not (
        os.environ.get("EVA_WS_JWT_SECRET") or os.environ.get("EVA_WS_JWT_SECRET_FILE")
    ):
        print(f"eva-ws: set EVA_WS_JWT_SECRET to the secret the server uses; {DEV_SECRET_HINT}", file=sys.stderr)
        return 2
    try:
        token = mint_token(settings, sub=args.sub, customers=args.customer, roles=args.role, ttl_s=args.ttl)
    except ConfigError as error:
        print(f"eva-ws: {error}", file=sys.stderr)
        return 2
    try:
        # The server's verifier with the server's settings: a token printed here is one it accepts.
        asyncio.run(TokenVerifier(settings).verify(token))
    except AuthError as error:
        print(f"eva-ws: the server would refuse this token: {error.message}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _control(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """POST one control command to a deployment; print its answer."""
    url = args.url or os.environ.get(CONTROL_URL_ENV)
    token = args.token or os.environ.get(ADMIN_TOKEN_ENV)
    if not url or not token:
        parser.error(f"give --url (or {CONTROL_URL_ENV}) and --token (or {ADMIN_TOKEN_ENV})")
    body: dict[str, object]
    if args.command == "disconnect":
        body = {"userId": args.user} if args.reason is None else {"userId": args.user, "reason": args.reason}
    elif args.jti is not None and args.user is None and args.before is None:
        body = {"jti": args.jti}
    elif args.jti is None and args.user is not None and args.before is not None:
        body = {"userId": args.user, "issuedBefore": args.before}
    else:
        parser.error("revoke needs --user with --before, or --jti alone")
    request = urllib.request.Request(  # noqa: S310  # an operator's own URL, http or https
        f"{url.rstrip('/')}/api/v1/{args.command}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=CONTROL_TIMEOUT_S) as response:  # noqa: S310  # as above
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as error:
        try:
            answer = json.loads(error.read())
            reason = f"{answer['error']}: {answer['message']}"
        except (ValueError, KeyError, TypeError):
            reason = "no JSON answer"
        print(f"eva-ws: {args.command} refused with {error.code} ({reason})", file=sys.stderr)
    except (urllib.error.URLError, OSError) as error:
        print(f"eva-ws: cannot reach {url}: {error}", file=sys.stderr)
    return 1


def _run(settings: Settings) -> None:
    from service.server import serve

    try:
        import uvloop
    except ImportError:  # uvloop is optional on platforms without a wheel
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command in ("disconnect", "revoke"):
        # A client of a deployment: the server's settings play no part.
        return _control(parser, args)
    try:
        settings = load_settings(_environment(args))
    except ConfigError as error:
        message = f"configuration error: {error}"
        if args.command == "token" and "JWT_SECRET" in str(error):
            message += f" ({DEV_SECRET_HINT})"
        return _refuse(args.command, "config_invalid", message, exit_code=2)
    if args.command == "token":
        return _token(settings, args)
    from service.server import CannotListen

    configure_logging(settings.log_level, pod_id=settings.pod_id)
    get_logger("eva_ws").debug("settings_loaded", pod_id=settings.pod_id)
    try:
        _run(settings)
    except CannotListen as error:
        return _refuse(args.command, "listen_failed", str(error), exit_code=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
