"""Settings read once from ``EVA_WS_*`` environment variables and validated at start."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

Mode = Literal["development", "production"]

ENV_PREFIX: Final = "EVA_WS_"
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

    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_secret: str | None = None
    # PEM text of the verification key for RS*/ES*/PS*/EdDSA (or EVA_WS_JWT_PUBLIC_KEY_FILE).
    jwt_public_key: str | None = None
    # PEM text of a signing key, only for `eva-ws token` with asymmetric algorithms.
    jwt_private_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: int = 30
    # After a token expires on an open socket: time to refresh in-band before the close.
    token_refresh_grace_s: int = 25

    # Exact `scheme://host[:port]` values; "*" allows every origin. Requests without
    # an Origin header (non-browser clients) are always allowed: they carry a token.
    allowed_origins: tuple[str, ...] = ()
    # Origins allowed to call the HTTP API from a browser; empty means the same as allowed_origins.
    cors_origins: tuple[str, ...] = ()

    max_message_bytes: int = 65_536
    send_queue_size: int = 256
    heartbeat_s: float = 25.0
    rate_limit_per_s: float = 20.0
    rate_limit_burst: int = 40
    # Messages refused by the rate limiter before the connection is closed with 1008.
    rate_limit_max_violations: int = 20
    max_subscriptions: int = 128

    # Seconds between readiness turning false and the first socket close on SIGTERM.
    drain_delay_s: float = 5.0
    # Seconds the drain spreads the 1012 closes over, so clients do not reconnect at once.
    drain_spread_s: float = 5.0

    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = "info"

    # None: on in development, off in production.
    demo_publisher: bool | None = None
    demo_interval_s: float = 1.0

    @property
    def demo_enabled(self) -> bool:
        return self.mode == "development" if self.demo_publisher is None else self.demo_publisher

    @property
    def signing_key(self) -> str:
        """The key `eva-ws token` signs with."""
        if self.jwt_algorithms[0] in SYMMETRIC_ALGORITHMS:
            assert self.jwt_secret is not None
            return self.jwt_secret
        if self.jwt_private_key is None:
            raise ConfigError("EVA_WS_JWT_PRIVATE_KEY (or _FILE) is needed to sign tokens with an asymmetric algorithm")
        return self.jwt_private_key

    @property
    def verification_key(self) -> str:
        if self.jwt_algorithms[0] in SYMMETRIC_ALGORITHMS:
            assert self.jwt_secret is not None
            return self.jwt_secret
        assert self.jwt_public_key is not None
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
    return value.lower()


_KNOWN: Final = frozenset(
    ENV_PREFIX + name.upper()
    for name in (
        *Settings.__dataclass_fields__,
        "jwt_public_key_file",
        "jwt_private_key_file",
        "jwt_secret_file",
    )
)


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
    if symmetric:
        if secret is None:
            if mode == "production":
                raise ConfigError(
                    f"{ENV_PREFIX}JWT_SECRET is required in production (at least {MIN_SECRET_BYTES} bytes)"
                )
            secret = _dev_secret()
        elif len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"{ENV_PREFIX}JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
    elif public_key is None:
        raise ConfigError(f"{ENV_PREFIX}JWT_PUBLIC_KEY (or _FILE) is required for {algorithms[0]}")

    tls_cert, tls_key = _get(env, "tls_cert"), _get(env, "tls_key")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError(f"set both {ENV_PREFIX}TLS_CERT and {ENV_PREFIX}TLS_KEY, or neither")
    for path in (tls_cert, tls_key):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"TLS file {path!r} does not exist")

    redis_url = _get(env, "redis_url")
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://", "redis+cluster://")):
        raise ConfigError(f"{ENV_PREFIX}REDIS_URL must start with redis://, rediss://, unix:// or redis+cluster://")

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
        jwt_algorithms=algorithms,
        jwt_secret=secret,
        jwt_public_key=public_key,
        jwt_private_key=private_key,
        jwt_audience=_get(env, "jwt_audience"),
        jwt_issuer=_get(env, "jwt_issuer"),
        jwt_leeway_s=_int(env, "jwt_leeway_s", 30, minimum=0, maximum=300),
        token_refresh_grace_s=_int(env, "token_refresh_grace_s", 25, minimum=1, maximum=3600),
        allowed_origins=tuple(_origin(o, "ALLOWED_ORIGINS") for o in _list(env, "allowed_origins")),
        cors_origins=tuple(_origin(o, "CORS_ORIGINS") for o in _list(env, "cors_origins")),
        max_message_bytes=_int(env, "max_message_bytes", 65_536, minimum=256, maximum=16 * 1024 * 1024),
        send_queue_size=_int(env, "send_queue_size", 256, minimum=1, maximum=1_000_000),
        heartbeat_s=_float(env, "heartbeat_s", 25.0, minimum=1.0, maximum=3600.0),
        rate_limit_per_s=_float(env, "rate_limit_per_s", 20.0, minimum=0.1, maximum=100_000.0),
        rate_limit_burst=burst,
        rate_limit_max_violations=_int(env, "rate_limit_max_violations", 20, minimum=1, maximum=100_000),
        max_subscriptions=_int(env, "max_subscriptions", 128, minimum=1, maximum=100_000),
        drain_delay_s=_float(env, "drain_delay_s", 5.0, minimum=0.0, maximum=600.0),
        drain_spread_s=_float(env, "drain_spread_s", 5.0, minimum=0.0, maximum=600.0),
        tls_cert=tls_cert,
        tls_key=tls_key,
        log_level=log_level,
        demo_publisher=_bool(env, "demo_publisher"),
        demo_interval_s=_float(env, "demo_interval_s", 1.0, minimum=0.01, maximum=3600.0),
    )


def _dev_secret() -> str:
    # Development only: a fresh secret per process, so dev tokens never work in production.
    return secrets.token_urlsafe(MIN_SECRET_BYTES)
