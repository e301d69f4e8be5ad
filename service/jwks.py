"""Public keys from an identity provider's JWKS endpoint: cached by kid, fetched rarely, never blocking the loop."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, Final

import aiohttp
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from service.log import get_logger

log = get_logger("eva_ws.jwks")

# A JWKS document is a few KiB; a bigger answer is refused rather than buffered.
MAX_JWKS_BYTES: Final = 256 * 1024
FETCH_TIMEOUT_S: Final = 5.0
# What a JWKS may contribute: public keys of the kinds JWT signatures use.
_PUBLIC_KEY_TYPES: Final = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)


class JwksClient:
    """Verification keys by kid, refreshed from `url`.

    An unknown kid triggers a fetch only when the last attempt is older than `cooldown_s`:
    tokens with random kids cost one fetch per cooldown, not one each (PyJWKClient's default
    behaviour, which also blocks the loop with urllib). Concurrent misses share one fetch.
    Keys older than `max_age_s` are refetched, so a key the IdP removed stops working; if
    the IdP is unreachable the last good keys stay in use.
    """

    def __init__(self, url: str, *, cooldown_s: float, max_age_s: float) -> None:
        self._url = url
        self._cooldown_s = cooldown_s
        self._max_age_s = max_age_s
        self._keys: dict[str, Any] = {}
        self._loaded_at: float | None = None
        self._attempted_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        # Fetch attempts since start; exposed for tests and diagnostics.
        self.fetches = 0

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S))
        await self._refresh()

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
        if self._session is not None:
            await self._session.close()

    async def key(self, kid: str) -> Any | None:
        """The key for `kid`, fetching the set first if it is unknown or stale and the cooldown allows."""
        now = time.monotonic()
        stale = self._loaded_at is None or now - self._loaded_at > self._max_age_s
        if (kid not in self._keys or stale) and self._may_fetch(now):
            await self._refresh()
        return self._keys.get(kid)

    def _may_fetch(self, now: float) -> bool:
        return self._inflight is not None or self._attempted_at is None or now - self._attempted_at >= self._cooldown_s

    async def _refresh(self) -> None:
        if self._inflight is None:
            self._attempted_at = time.monotonic()
            self.fetches += 1
            self._inflight = asyncio.ensure_future(self._fetch())
            self._inflight.add_done_callback(self._fetched)
        # Shielded: one cancelled handshake must not cancel the fetch others wait for.
        await asyncio.shield(self._inflight)

    def _fetched(self, task: asyncio.Task[None]) -> None:
        self._inflight = None

    async def _fetch(self) -> None:
        assert self._session is not None, "JwksClient.start() was not awaited"
        try:
            async with self._session.get(self._url, headers={"Accept": "application/json"}) as response:
                if response.status != 200:
                    log.warning("jwks_fetch_failed", status=response.status)
                    return
                body = await _read_capped(response, MAX_JWKS_BYTES)
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning("jwks_fetch_failed", error=type(error).__name__)
            return
        if body is None:
            log.warning("jwks_fetch_failed", error="too_large")
            return
        keys = parse_jwks(body)
        if keys is None:
            log.warning("jwks_fetch_failed", error="invalid_document")
            return
        self._keys = keys
        self._loaded_at = time.monotonic()
        log.info("jwks_loaded", keys=len(keys))


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, however many pieces it arrives in; None as soon as it is longer than `limit` bytes."""
    if response.content_length is not None and response.content_length > limit:
        return None
    body = bytearray()
    # read(n) returns what has arrived so far (a chunk, a TCP segment), and b"" only at the end.
    while piece := await response.content.read(limit + 1 - len(body)):
        body += piece
        if len(body) > limit:
            return None
    return bytes(body)


def parse_jwks(body: bytes) -> dict[str, Any] | None:
    """Signing public keys by kid; None when the document is not a JWKS at all.

    Every other entry is skipped, and one log line counts them by reason.
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        return None
    keys: dict[str, Any] = {}
    skipped: Counter[str] = Counter()
    for entry in document["keys"]:
        read = _read_entry(entry)
        if isinstance(read, str):
            skipped[read] += 1
        else:
            kid, key = read
            keys[kid] = key
    if skipped:
        log.warning("jwks_keys_skipped", **skipped)
    return keys


def _read_entry(entry: object) -> tuple[str, Any] | str:
    """(kid, public key) of one JWKS entry, or the reason it is skipped."""
    if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
        return "no_kid"
    # Symmetric ("oct") keys never come from a JWKS: accepting one would let its holder, or
    # anyone who reads the document, mint tokens (and JWKS needs public-key algorithms).
    if entry.get("kty") == "oct":
        return "symmetric_key"
    if entry.get("use", "sig") != "sig":
        return "not_for_signing"
    try:
        key = jwt.PyJWK(entry).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
        return "unreadable"
    # A JWK with private parts (`d`) becomes a private key: PyJWT cannot always verify with
    # one (an RSA one raises), and a published private key lets anyone who reads it mint tokens.
    if not isinstance(key, _PUBLIC_KEY_TYPES):
        return "private_key"
    return entry["kid"], key
