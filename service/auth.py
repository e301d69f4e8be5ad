"""JWT verification and minting, and what a verified user may subscribe to."""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote_plus

import jwt
from aiohttp import web

from service.config import Settings
from service.hmac_tokens import HmacTokenCheck, plain_header
from service.jwks import JwksClient
from service.log import get_logger
from service.protocol import (
    MAX_TOKEN_LENGTH,
    Channel,
    ClientMessage,
    ErrorCode,
    Filters,
    ProtocolError,
    is_valid_id,
    subscription_key,
)

if TYPE_CHECKING:
    from service.revocations import RevokedTokens

log = get_logger("eva_ws.auth")

MAX_CUSTOMERS_PER_TOKEN: Final = 1000
MAX_EXP_S: Final = 253_402_300_799
ROLE_ADMIN: Final = "admin"
ROLE_PUBLISHER: Final = "publisher"
# The longest lifetime (exp - iat) of a token a pod accepts. It bounds how long a revocation
# must be kept (service/revocations.py): a token issued before it was revoked is dead after this.
MAX_TOKEN_LIFETIME_S: Final = 86_400
# The longest `jti` a revocation can name; `jti` is any string the issuer chose.
MAX_JTI_LENGTH: Final = 256
# Most tokens carry no role; every connection shares this one.
NO_ROLES: Final[frozenset[str]] = frozenset()


class AuthError(Exception):
    """A token was refused; `reason` is a stable snake_case word for metrics and logs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def error(self) -> str:
        """The `error` word of the 401: `token_revoked` for a revoked token (do not retry it), else `unauthorized`."""
        return "token_revoked" if self.reason == "revoked" else "unauthorized"


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified token: who the user is and what it may see."""

    user_id: str
    # Sorted and without duplicates. A tuple because a pod holds one Principal per socket
    # and most tokens name one customer: 48 bytes instead of a 216-byte frozenset.
    customer_ids: tuple[str, ...]
    roles: frozenset[str]
    # Unix seconds.
    expires_at: float
    # Unix seconds (`iat`) and the `jti` claim: what a revocation names (service/revocations.py).
    issued_at: float = 0.0
    token_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return ROLE_ADMIN in self.roles

    @property
    def is_publisher(self) -> bool:
        return ROLE_PUBLISHER in self.roles

    def can_see_customer(self, customer_id: str) -> bool:
        return self.is_admin or customer_id in self.customer_ids

    def can_see_user(self, user_id: str) -> bool:
        return self.is_admin or user_id == self.user_id


class TokenVerifier:
    """Validates tokens against the configured keys, algorithms, audience and issuer."""

    def __init__(
        self, settings: Settings, *, jwks: JwksClient | None = None, revoked: RevokedTokens | None = None
    ) -> None:
        """`revoked`: tokens refused although valid (AuthError reason `revoked`); None: none."""
        self._revoked = revoked
        self._default_key = settings.default_verification_key
        self._keys: dict[str, str] = dict(settings.jwt_keys)
        self._jwks = jwks
        self._algorithms = list(settings.jwt_algorithms)
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway_s = settings.jwt_leeway_s
        # One key configured: issuers that stamp a kid anyway keep working.
        self._single_key = not self._keys and jwks is None and self._default_key is not None
        self._quick = HmacTokenCheck(
            settings.jwt_algorithms, audience=self._audience, issuer=self._issuer, leeway_s=self._leeway_s
        )

    async def verify(self, token: object) -> Principal:
        """A Principal, or AuthError; messages never repeat the token or any part of it."""
        principal = await self._verify(token)
        if principal.expires_at - principal.issued_at > MAX_TOKEN_LIFETIME_S:
            raise AuthError("lifetime_too_long", f"token lifetime (exp - iat) exceeds {MAX_TOKEN_LIFETIME_S} s")
        if self._revoked is not None and self._revoked.revokes(principal):
            raise AuthError("revoked", "token has been revoked")
        return principal

    async def verify_request(self, request: web.Request) -> Principal:
        """The Principal of the request's token (see token_from_request), or AuthError."""
        token = token_from_request(request)
        if token is None:
            raise AuthError("missing", "a token is required (?token= or Authorization: Bearer)")
        return await self.verify(token)

    async def _verify(self, token: object) -> Principal:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("malformed", "token is missing or too long")
        try:
            if self._single_key:
                # One key whatever the kid: no need to read the header before the signature check.
                return self._decode(token, self._default_key)
            header = plain_header(token)
            if header is None:
                try:
                    header = jwt.get_unverified_header(token)
                except jwt.PyJWTError:
                    raise AuthError("malformed", "token is malformed") from None
            kid = header.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise AuthError("malformed", "token kid must be a string")
            return self._decode(token, await self._key_for(kid))
        except AuthError:
            raise
        except Exception as error:  # noqa: BLE001  # refused, not swallowed: the caller gets an AuthError
            # Hostile input reaches errors no library documents (a RecursionError from a deeply
            # nested header in some PyJWT releases, header bytes that are not UTF-8, a key of an
            # unexpected kind): still a refused token, never a 500 or a dropped socket.
            log.warning("token_verification_error", error=type(error).__name__)
            raise AuthError("malformed", "token is malformed") from None

    async def _key_for(self, kid: str | None) -> Any:
        if kid is None:
            key: Any = self._default_key
        else:
            key = self._keys.get(kid)
            if key is None and self._jwks is not None:
                key = await self._jwks.key(kid)
        if key is None:
            raise AuthError("unknown_key", "token is signed with an unknown key")
        return key

    def _decode(self, token: str, key: Any) -> Principal:
        claims = self._quick.claims(token, key) if self._quick.enabled else None
        return _principal(claims if claims is not None else self._pyjwt_decode(token, key))

    def _pyjwt_decode(self, token: str, key: Any) -> dict[str, Any]:
        """The claims, or AuthError naming why PyJWT refused the token."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                # From configuration, never from the token header (algorithm confusion).
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway_s,
                # PyJWT checks exp/iat only when present; a token must carry them.
                options={"require": ["exp", "iat", "sub"], "strict_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("expired", "token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("not_yet_valid", "token is not valid yet") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise AuthError("wrong_audience_or_issuer", "token is for another audience or issuer") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("algorithm_not_allowed", "token algorithm is not allowed") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("missing_claim", f"token lacks the {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "token signature is invalid") from None
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError):
            # PyJWTError also covers a key of the wrong type (InvalidKeyError); the others
            # come from claims PyJWT converts without checking (an `iat` of 1e400 is inf).
            raise AuthError("malformed", "token is malformed") from None
        return claims


def _principal(claims: dict[str, Any]) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not is_valid_id(sub):
        raise AuthError("invalid_claim", "sub must be 1-128 characters of A-Z a-z 0-9 . _ ~ @ + | : = -")
    customers: set[str] = set()
    single = claims.get("customerId")
    if single is not None:
        if not is_valid_id(single):
            raise AuthError("invalid_claim", "customerId must be a valid id")
        customers.add(single)
    many = claims.get("customerIds")
    if many is not None:
        if not isinstance(many, list) or len(many) > MAX_CUSTOMERS_PER_TOKEN or not all(is_valid_id(c) for c in many):
            raise AuthError("invalid_claim", "customerIds must be a list of valid ids")
        customers.update(many)
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise AuthError("invalid_claim", "roles must be a list of strings")
    exp = claims["exp"]
    # The upper bound keeps timers and ISO dates representable (year 9999).
    if not isinstance(exp, int | float) or not 0 < exp <= MAX_EXP_S:
        raise AuthError("invalid_claim", "exp must be a number of seconds before year 10000")
    iat = claims["iat"]
    if not isinstance(iat, int | float) or not 0 <= iat <= MAX_EXP_S:
        raise AuthError("invalid_claim", "iat must be a number of seconds before year 10000")
    jti = claims.get("jti")
    return Principal(
        user_id=sub,
        # Interned: the sockets of one customer share its id instead of holding a copy each.
        customer_ids=tuple(sorted(sys.intern(c) for c in customers)),
        roles=frozenset(roles) if roles else NO_ROLES,
        expires_at=float(exp),
        issued_at=float(iat),
        # Kept only when a revocation could name it.
        token_id=jti if isinstance(jti, str) and 0 < len(jti) <= MAX_JTI_LENGTH else None,
    )


def query_value(request: web.BaseRequest, name: str) -> str | None:
    """The first `name=` of the query string, or None.

    Parsed here rather than read from `request.query`, which keeps a parsed copy on the
    request: a WebSocket's request lives as long as the socket, so every idle socket
    would hold it.
    """
    _, _, query = request.raw_path.partition("?")
    # As parse_qsl reads it, without decoding every other field (the token is long).
    for field in query.split("&"):
        key, _, value = field.partition("=")
        if key != name and ("%" in key or "+" in key):
            key = unquote_plus(key)
        if key == name:
            return unquote_plus(value) if "%" in value or "+" in value else value
    return None


def token_from_request(request: web.Request) -> str | None:
    """`?token=`, else `Authorization: Bearer <t>`, else a bare token in Authorization."""
    token = query_value(request, "token")
    if token:
        return token
    header = request.headers.get("Authorization", "").strip()
    scheme, _, rest = header.partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip() or None
    return header or None


def mint_token(
    settings: Settings,
    *,
    sub: str,
    customers: list[str],
    roles: list[str] | None = None,
    ttl_s: int = 3600,
    now: float | None = None,
) -> str:
    """Sign a token with the configured key; for development, tests and the demo page."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": sub,
        "iat": issued,
        "exp": issued + ttl_s,
        "jti": uuid.uuid4().hex,
        "roles": roles or [],
    }
    if len(customers) == 1:
        claims["customerId"] = customers[0]
    elif customers:
        claims["customerIds"] = customers
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    return jwt.encode(claims, settings.signing_key, algorithm=settings.jwt_algorithms[0])


def authorize_subscription(principal: Principal, message: ClientMessage) -> tuple[str, Filters]:
    """Resolve a (un)subscribe to its subscription key, or raise ProtocolError(forbidden)."""
    assert message.channel is not None
    filters = message.filters
    cid = message.correlation_id

    def forbidden(why: str) -> ProtocolError:
        return ProtocolError(ErrorCode.FORBIDDEN, why, cid)

    if message.channel is Channel.TRANSACTIONS:
        customer = filters.customer_id
        if customer is None:
            if len(principal.customer_ids) != 1:
                raise ProtocolError(
                    ErrorCode.INVALID_FILTERS, "filters.customerId is required: the token names several customers", cid
                )
            (customer,) = principal.customer_ids
            filters = Filters(customer_id=customer, user_id=filters.user_id, transaction_ids=filters.transaction_ids)
        if not principal.can_see_customer(customer):
            raise forbidden(f"not allowed to see customer {customer!r}")
        return subscription_key(Channel.TRANSACTIONS, customer), filters

    if filters.customer_id is not None or filters.transaction_ids is not None:
        raise ProtocolError(ErrorCode.INVALID_FILTERS, f"{message.channel} takes only the userId filter", cid)
    user = filters.user_id or principal.user_id
    if not principal.can_see_user(user):
        raise forbidden(f"not allowed to see user {user!r}")
    return subscription_key(message.channel, user), Filters(user_id=user)


def entitled_to_key(principal: Principal, key: str) -> bool:
    """Whether a subscription key is still allowed (used when a token is refreshed)."""
    channel, _, routing_id = key.partition(":")
    if channel == Channel.TRANSACTIONS:
        return principal.can_see_customer(routing_id)
    return principal.can_see_user(routing_id)
