"""Public keys from an identity provider's JWKS endpoint: cached by kid, fetched rarely, never blocking the loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import aiohttp
import jwt
import orjson

from service.log import get_logger

log = get_logger("eva_ws.jwks")

# A JWKS document is a few KiB; a bigger answer is refused rather than buffered.
MAX_JWKS_BYTES: Final = 256 * 1024
FETCH_TIMEOUT_S: Final = 5.0


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
                body = await response.content.read(MAX_JWKS_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning("jwks_fetch_failed", error=type(error).__name__)
            return
        if len(body) > MAX_JWKS_BYTES:
            log.warning("jwks_fetch_failed", error="too_large")
            return
        keys = parse_jwks(body)
        if keys is None:
            log.warning("jwks_fetch_failed", error="invalid_document")
            return
        self._keys = keys
        self._loaded_at = time.monotonic()
        log.info("jwks_loaded", keys=len(keys))


def parse_jwks(body: bytes) -> dict[str, Any] | None:
    """Signing public keys by kid; None when the document is not a JWKS at all."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        return None
    keys: dict[str, Any] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        # Symmetric ("oct") keys never come from a JWKS: accepting one would let its
        # holder, or anyone who reads the document, mint tokens.
        if not isinstance(kid, str) or entry.get("kty") == "oct" or entry.get("use", "sig") != "sig":
            continue
        try:
            keys[kid] = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue
    return keys
