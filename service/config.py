"""Settings read once from ``EVA_WS_*`` environment variables and validated at start."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

import orjson
from cryptography.hazmat.primitives.serialization import load_pem_public_key

Mode = Literal["development", "production"]

ENV_PREFIX: Final = "EVA_WS_"
# What EVA_WS_REDIS_URL may be: one Redis (TCP, TLS, Unix socket) or a Redis Cluster.
REDIS_URL_SCHEMES: Final = ("redis://", "rediss://", "unix://", "redis+cluster://")
ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"}
)
SYMMETRIC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
MIN_SECRET_BYTES: Final = 32


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable and what is expected."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Every knob of a pod. Field ``x`` is read from ``EVA_WS_X``."""

    mode: Mode = "production"
    host: str = "0.0.0.0"
    port: int = 8080
    # 0 serves /healthz, /readyz and /metrics on the main port; otherwise only on this one.
    ops_port: int = 0
    pod_id: str = field(default_factory=socket.gethostname)

    # None runs the embedded in-process broker (one node, nothing else to start).
    redis_url: str | None = None
    # Prepended to every Redis channel and key, so several deployments can share one Redis.
    redis_prefix: str = ""
    history_size: int = 1000
    history_ttl_s: int = 86_400
    # A publish that repeats an event's idempotency key within this many seconds is answered
    # with the original event's position and not delivered again.
    idempotency_window_s: int = 300
    # Transactions kept per channel in its state (what `"snapshot": true` sends); the least
    # recently changed are dropped beyond it.
    state_max_items: int = 10_000
    # Upper bound of the jittered backoff between attempts to reach Redis again.
    redis_reconnect_max_s: float = 5.0
    # Each pod publishes a canary through Redis to itself this often...
    broker_canary_interval_s: float = 1.0
    # ...and is not ready while none sent within this many seconds came back.
    broker_canary_max_lag_s: float = 5.0
    # A pod's presence entries outlive a crash of the pod by at most this long.
    presence_ttl_s: float = 30.0

    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_secret: str | None = None
    # PEM text of the verification key for RS*/ES*/PS*/EdDSA (or EVA_WS_JWT_PUBLIC_KEY_FILE).
    jwt_public_key: str | None = None
    # PEM text of a signing key, only for `eva-ws token` with asymmetric algorithms.
    jwt_private_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: int = 30
    # Key rotation: more verification keys, chosen by the token's `kid` header. A JSON object
    # kid -> secret (HS*) or PEM public key (others), from EVA_WS_JWT_KEYS or EVA_WS_JWT_KEYS_FILE.
    # A token without `kid` is checked against the default key (EVA_WS_JWT_SECRET / _PUBLIC_KEY).
    jwt_keys: tuple[tuple[str, str], ...] = ()
    # An identity provider's JWKS endpoint (public-key algorithms only); keys are cached by kid.
    jwks_url: str | None = None
    # At most one JWKS fetch per cooldown, however many unknown kids arrive (no IdP hammering).
    jwks_cooldown_s: float = 30.0
    # Cached JWKS keys are refetched after this, so a key the IdP removed stops working.
    jwks_max_age_s: float = 300.0
    # After a token expires on an open socket: time to refresh in-band before the close.
    token_refresh_grace_s: int = 25

    # Exact `scheme://host[:port]` values; "*" allows every origin. Requests without
    # an Origin header (non-browser clients) are always allowed: they carry a token.
    allowed_origins: tuple[str, ...] = ()
    # Origins allowed to call the HTTP API from a browser; empty means the same as allowed_origins.
    cors_origins: tuple[str, ...] = ()

    max_message_bytes: int = 65_536
    send_queue_size: int = 256
    # Longest wait of a client written in a long round (a busy fan-out) before its next write
    # (see connection.Flusher); 0 writes every loop turn.
    write_window_ms: float = 8.0
    heartbeat_s: float = 25.0
    rate_limit_per_s: float = 20.0
    rate_limit_burst: int = 40
    # Messages refused by the rate limiter before the connection is closed with 1008.
    rate_limit_max_violations: int = 20
    # History events (resume replays, snapshot transactions) all the sockets of one user may make
    # this pod read, per second and at once (service/resume_budget.py). The burst holds a few
    # whole histories, so a user reconnecting a few tabs never waits.
    resume_events_per_user_s: float = 5000.0
    resume_events_per_user_burst: int = 10_000
    max_subscriptions: int = 128
    # Open sockets per user (token `sub`) and per client IP on this pod; 0 means no cap.
    # Beyond it the upgrade gets 429. Many users can share one IP behind NAT, hence off by default.
    max_connections_per_user: int = 100
    max_connections_per_ip: int = 0
    # Header a trusted load balancer sets to the client address (e.g. X-Forwarded-For, whose last
    # entry is used); None uses the TCP peer. Set it only when clients cannot reach pods directly.
    client_ip_header: str | None = None
    # A connection must send a complete request within this (slowloris); also the idle time of a
    # keep-alive HTTP connection between requests. aiohttp's keepalive_timeout.
    handshake_timeout_s: float = 10.0
    # Bytes of one request's line and headers together (a browser sends 1-4 KiB, a token in the
    # query up to 6 KiB more); beyond it the request gets 431 before the parser keeps more.
    max_request_head_bytes: int = 16_384

    # Seconds between readiness turning false and the first socket close on SIGTERM.
    drain_delay_s: float = 5.0
    # Seconds the drain spreads the 1012 closes over, so clients do not reconnect at once.
    drain_spread_s: float = 5.0

    # Seconds between rebalance rounds (Redis broker only); 0 turns rebalancing off.
    rebalance_interval_s: float = 0.0
    # A pod sheds connections only above (1 + tolerance) x the cluster average.
    rebalance_tolerance: float = 0.2
    # Most connections a pod closes with 4013 per round; 0 turns rebalancing off.
    rebalance_max_shed_per_interval: int = 20

    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = "info"

    # None: on in development, off in production.
    # The transactional outbox's PostgreSQL (docs/outbox.md); None: this pod relays no outbox.
    # Not in repr: it may hold a password.
    outbox_dsn: str | None = field(default=None, repr=False)
    # Rows one relay transaction claims, publishes and deletes at most.
    outbox_batch_size: int = 500
    # How often a relay looks at the outbox without a commit's NOTIFY (one may be missed on a reconnect).
    outbox_poll_interval_s: float = 1.0
    demo_publisher: bool | None = None
    demo_interval_s: float = 1.0

    @property
    def demo_enabled(self) -> bool:
        return self.mode == "development" if self.demo_publisher is None else self.demo_publisher

    @property
    def signing_key(self) -> str:
        """The key `eva-ws token` signs with."""
        if self.jwt_algorithms[0] in SYMMETRIC_ALGORITHMS:
            if self.jwt_secret is None:
                raise ConfigError("EVA_WS_JWT_SECRET is needed to sign tokens (keys in EVA_WS_JWT_KEYS need a kid)")
            return self.jwt_secret
        if self.jwt_private_key is None:
            raise ConfigError("EVA_WS_JWT_PRIVATE_KEY (or _FILE) is needed to sign tokens with an asymmetric algorithm")
        return self.jwt_private_key

    @property
    def default_verification_key(self) -> str | None:
        """The key for tokens without `kid`; None when only keyed keys (JWT_KEYS, JWKS) are configured."""
        if self.jwt_algorithms[0] in SYMMETRIC_ALGORITHMS:
            return self.jwt_secret
        return self.jwt_public_key

    @property
    def effective_cors_origins(self) -> tuple[str, ...]:
        return self.cors_origins or self.allowed_origins


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(ENV_PREFIX + name.upper())
    if value is None:
        return None
    value = value.strip()
    return value or None


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not an integer") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={value} must be between {minimum} and {maximum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float, maximum: float) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a number") from None
    if not minimum <= value <= maximum:  # also rejects nan
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={value} must be between {minimum} and {maximum}")
    return value


def _bool(env: Mapping[str, str], name: str) -> bool | None:
    raw = _get(env, name)
    if raw is None:
        return None
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a boolean (use true or false)")


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = _get(env, name)
    if raw is None:
        return ()
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _text_or_file(env: Mapping[str, str], name: str) -> str | None:
    inline = _get(env, name)
    path = _get(env, name + "_file")
    if inline and path:
        raise ConfigError(f"set {ENV_PREFIX}{name.upper()} or {ENV_PREFIX}{name.upper()}_FILE, not both")
    if path:
        try:
            return Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}_FILE={path!r} cannot be read: {exc.strerror}") from None
    return inline


def _origin(value: str, variable: str) -> str:
    if value == "*":
        return value
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in {"http", "https"} or not rest or "/" in rest or rest != rest.strip():
        raise ConfigError(f"{ENV_PREFIX}{variable}: {value!r} is not an origin like https://app.example.com")
    if "*" in rest:
        # Matching is exact; a pattern here would silently match nothing (or only itself).
        raise ConfigError(f"{ENV_PREFIX}{variable}: {value!r}: wildcards are not supported; list each origin")
    return value.lower()


_KNOWN: Final = frozenset(
    ENV_PREFIX + name.upper()
    for name in (
        *Settings.__dataclass_fields__,
        "jwt_public_key_file",
        "jwt_private_key_file",
        "jwt_secret_file",
        "jwt_keys_file",
    )
) | {
    # Read by scripts/ (which virtualenv to use), not by the service; exported by users.
    ENV_PREFIX + "VENV",
    # Read by `eva-ws disconnect` and `eva-ws revoke` (a deployment's URL, an admin token), not by the service.
    ENV_PREFIX + "URL",
    ENV_PREFIX + "ADMIN_TOKEN",
}


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate settings; raise ConfigError naming the first bad variable."""
    env = os.environ if env is None else env
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in _KNOWN)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]} (known: see docs/configuration.md)")

    mode = _get(env, "mode") or "production"
    if mode not in ("development", "production"):
        raise ConfigError(f"{ENV_PREFIX}MODE={mode!r} must be 'development' or 'production'")

    algorithms = _list(env, "jwt_algorithms") or ("HS256",)
    for alg in algorithms:
        if alg.lower() == "none":
            raise ConfigError(f"{ENV_PREFIX}JWT_ALGORITHMS must never contain 'none'")
        if alg not in SYMMETRIC_ALGORITHMS | ASYMMETRIC_ALGORITHMS:
            raise ConfigError(f"{ENV_PREFIX}JWT_ALGORITHMS: unknown algorithm {alg!r}")
    families = {alg in SYMMETRIC_ALGORITHMS for alg in algorithms}
    if len(families) > 1:
        # Mixing HMAC and public-key algorithms is how key-confusion attacks start.
        raise ConfigError(f"{ENV_PREFIX}JWT_ALGORITHMS mixes HMAC and public-key algorithms")
    symmetric = families == {True}

    secret = _text_or_file(env, "jwt_secret")
    public_key = _text_or_file(env, "jwt_public_key")
    private_key = _text_or_file(env, "jwt_private_key")
    jwt_keys = _jwt_keys(_text_or_file(env, "jwt_keys"), symmetric=symmetric)
    jwks_url = _jwks_url(_get(env, "jwks_url"), symmetric=symmetric, mode=mode)
    if symmetric:
        if secret is None:
            if mode == "production" and not jwt_keys:
                raise ConfigError(
                    f"{ENV_PREFIX}JWT_SECRET (or {ENV_PREFIX}JWT_KEYS) is required in production "
                    f"(at least {MIN_SECRET_BYTES} bytes)"
                )
            if mode == "development":
                secret = _dev_secret()
        elif len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"{ENV_PREFIX}JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
    elif public_key is None and not jwt_keys and jwks_url is None:
        raise ConfigError(
            f"{ENV_PREFIX}JWT_PUBLIC_KEY (or _FILE), {ENV_PREFIX}JWT_KEYS or {ENV_PREFIX}JWKS_URL "
            f"is required for {algorithms[0]}"
        )

    tls_cert, tls_key = _get(env, "tls_cert"), _get(env, "tls_key")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError(f"set both {ENV_PREFIX}TLS_CERT and {ENV_PREFIX}TLS_KEY, or neither")
    for path in (tls_cert, tls_key):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"TLS file {path!r} does not exist")

    redis_url = _get(env, "redis_url")
    if redis_url is not None and not redis_url.startswith(REDIS_URL_SCHEMES):
        raise ConfigError(f"{ENV_PREFIX}REDIS_URL must start with {', '.join(REDIS_URL_SCHEMES)}")

    outbox_dsn = _get(env, "outbox_dsn")
    if outbox_dsn is not None and not outbox_dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{ENV_PREFIX}OUTBOX_DSN must be a postgresql:// URL")
    if outbox_dsn is not None and importlib.util.find_spec("psycopg") is None:
        raise ConfigError(f"{ENV_PREFIX}OUTBOX_DSN needs the outbox extra: pip install 'eva-ws[outbox]'")

    log_level = (_get(env, "log_level") or "info").lower()
    if log_level not in {"debug", "info", "warning", "error"}:
        raise ConfigError(f"{ENV_PREFIX}LOG_LEVEL={log_level!r} must be debug, info, warning or error")

    port = _int(env, "port", 8080, minimum=0, maximum=65535)
    ops_port = _int(env, "ops_port", 0, minimum=0, maximum=65535)
    if ops_port and ops_port == port:
        raise ConfigError(f"{ENV_PREFIX}OPS_PORT must differ from {ENV_PREFIX}PORT")

    pod_id = _get(env, "pod_id") or socket.gethostname()
    if not pod_id.isprintable() or len(pod_id) > 128:
        raise ConfigError(f"{ENV_PREFIX}POD_ID must be printable and at most 128 characters")

    burst = _int(env, "rate_limit_burst", 40, minimum=1, maximum=100_000)
    canary_interval_s = _float(env, "broker_canary_interval_s", 1.0, minimum=0.05, maximum=60.0)
    canary_max_lag_s = _float(env, "broker_canary_max_lag_s", 5.0, minimum=0.1, maximum=600.0)
    if canary_max_lag_s <= canary_interval_s:
        raise ConfigError(
            f"{ENV_PREFIX}BROKER_CANARY_MAX_LAG_S must be longer than {ENV_PREFIX}BROKER_CANARY_INTERVAL_S"
        )
    return Settings(
        mode=mode,  # type: ignore[arg-type]  # narrowed by the check above
        host=_get(env, "host") or "0.0.0.0",
        port=port,
        ops_port=ops_port,
        pod_id=pod_id,
        redis_url=redis_url,
        redis_prefix=_get(env, "redis_prefix") or "",
        history_size=_int(env, "history_size", 1000, minimum=1, maximum=1_000_000),
        history_ttl_s=_int(env, "history_ttl_s", 86_400, minimum=1, maximum=30 * 86_400),
        idempotency_window_s=_int(env, "idempotency_window_s", 300, minimum=1, maximum=86_400),
        state_max_items=_int(env, "state_max_items", 10_000, minimum=1, maximum=1_000_000),
        redis_reconnect_max_s=_float(env, "redis_reconnect_max_s", 5.0, minimum=0.1, maximum=300.0),
        broker_canary_interval_s=canary_interval_s,
        broker_canary_max_lag_s=canary_max_lag_s,
        presence_ttl_s=_float(env, "presence_ttl_s", 30.0, minimum=1.0, maximum=3600.0),
        jwt_algorithms=algorithms,
        jwt_secret=secret,
        jwt_public_key=public_key,
        jwt_private_key=private_key,
        jwt_audience=_get(env, "jwt_audience"),
        jwt_issuer=_get(env, "jwt_issuer"),
        jwt_leeway_s=_int(env, "jwt_leeway_s", 30, minimum=0, maximum=300),
        jwt_keys=jwt_keys,
        jwks_url=jwks_url,
        jwks_cooldown_s=_float(env, "jwks_cooldown_s", 30.0, minimum=0.0, maximum=86_400.0),
        jwks_max_age_s=_float(env, "jwks_max_age_s", 300.0, minimum=1.0, maximum=7 * 86_400.0),
        token_refresh_grace_s=_int(env, "token_refresh_grace_s", 25, minimum=1, maximum=3600),
        allowed_origins=tuple(_origin(o, "ALLOWED_ORIGINS") for o in _list(env, "allowed_origins")),
        cors_origins=tuple(_origin(o, "CORS_ORIGINS") for o in _list(env, "cors_origins")),
        max_message_bytes=_int(env, "max_message_bytes", 65_536, minimum=256, maximum=16 * 1024 * 1024),
        send_queue_size=_int(env, "send_queue_size", 256, minimum=1, maximum=1_000_000),
        write_window_ms=_float(env, "write_window_ms", 8.0, minimum=0.0, maximum=100.0),
        heartbeat_s=_float(env, "heartbeat_s", 25.0, minimum=1.0, maximum=3600.0),
        rate_limit_per_s=_float(env, "rate_limit_per_s", 20.0, minimum=0.1, maximum=100_000.0),
        rate_limit_burst=burst,
        rate_limit_max_violations=_int(env, "rate_limit_max_violations", 20, minimum=1, maximum=100_000),
        resume_events_per_user_s=_float(env, "resume_events_per_user_s", 5000.0, minimum=1.0, maximum=10_000_000.0),
        resume_events_per_user_burst=_int(env, "resume_events_per_user_burst", 10_000, minimum=1, maximum=100_000_000),
        max_subscriptions=_int(env, "max_subscriptions", 128, minimum=1, maximum=10_000),
        max_connections_per_user=_int(env, "max_connections_per_user", 100, minimum=0, maximum=1_000_000),
        max_connections_per_ip=_int(env, "max_connections_per_ip", 0, minimum=0, maximum=1_000_000),
        client_ip_header=_get(env, "client_ip_header"),
        handshake_timeout_s=_float(env, "handshake_timeout_s", 10.0, minimum=0.5, maximum=3600.0),
        max_request_head_bytes=_int(env, "max_request_head_bytes", 16_384, minimum=8192, maximum=1024 * 1024),
        drain_delay_s=_float(env, "drain_delay_s", 5.0, minimum=0.0, maximum=600.0),
        drain_spread_s=_float(env, "drain_spread_s", 5.0, minimum=0.0, maximum=600.0),
        rebalance_interval_s=_float(env, "rebalance_interval_s", 0.0, minimum=0.0, maximum=3600.0),
        rebalance_tolerance=_float(env, "rebalance_tolerance", 0.2, minimum=0.0, maximum=10.0),
        rebalance_max_shed_per_interval=_int(env, "rebalance_max_shed_per_interval", 20, minimum=0, maximum=100_000),
        tls_cert=tls_cert,
        tls_key=tls_key,
        log_level=log_level,
        outbox_dsn=outbox_dsn,
        outbox_batch_size=_int(env, "outbox_batch_size", 500, minimum=1, maximum=10_000),
        outbox_poll_interval_s=_float(env, "outbox_poll_interval_s", 1.0, minimum=0.05, maximum=3600.0),
        demo_publisher=_bool(env, "demo_publisher"),
        demo_interval_s=_float(env, "demo_interval_s", 1.0, minimum=0.01, maximum=3600.0),
    )


def _jwt_keys(raw: str | None, *, symmetric: bool) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    name = f"{ENV_PREFIX}JWT_KEYS"
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ConfigError(f"{name} is not JSON (expected an object kid -> key)") from None
    if not isinstance(parsed, dict) or not parsed:
        raise ConfigError(f"{name} must be a non-empty JSON object kid -> key")
    keys: list[tuple[str, str]] = []
    for kid, key in parsed.items():
        if not kid or len(kid) > 128 or not kid.isprintable():
            raise ConfigError(f"{name}: a kid must be 1-128 printable characters")
        if not isinstance(key, str):
            raise ConfigError(f"{name}: the key of kid {kid!r} must be a string")
        if symmetric and len(key.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"{name}: the secret of kid {kid!r} must be at least {MIN_SECRET_BYTES} bytes")
        if not symmetric:
            try:
                load_pem_public_key(key.encode())
            except (ValueError, TypeError):
                # A secret or private key here would be a key-confusion or leak waiting to happen.
                raise ConfigError(f"{name}: the key of kid {kid!r} is not a PEM public key") from None
        keys.append((kid, key))
    return tuple(keys)


_LOOPBACK_HOSTS: Final = frozenset({"localhost"})


def _jwks_url(raw: str | None, *, symmetric: bool, mode: str) -> str | None:
    if raw is None:
        return None
    name = f"{ENV_PREFIX}JWKS_URL"
    if symmetric:
        raise ConfigError(f"{name} needs public-key {ENV_PREFIX}JWT_ALGORITHMS (JWKS keys are public keys)")
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"{name}={raw!r} is not an http(s) URL")
    if parts.scheme == "http" and mode == "production" and not _is_loopback(parts.hostname):
        # Keys fetched in clear text could be replaced on the way: anyone could then mint tokens.
        raise ConfigError(f"{name} must use https in production (http only for a loopback host)")
    return raw


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _dev_secret() -> str:
    # Development only: a fresh secret per process, so dev tokens never work in production.
    return secrets.token_urlsafe(MIN_SECRET_BYTES)
