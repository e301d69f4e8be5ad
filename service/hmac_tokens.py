"""A quick check for the common HMAC-signed token; every other token, and every refusal, is PyJWT's.

A connect storm spends its CPU on handshakes, and PyJWT's general decoder costs about 45 µs
per token (it checks each base64 character in Python, parses JSON with the standard
library and re-derives the key), where the checks themselves take about 7. This module
accepts a token only when it is plainly valid: compact form in the strict base64url
alphabet, JSON that orjson and the standard library read alike, a header of nothing but
`alg`, `typ` and `kid`, an allowed HS256/384/512 `alg`, a matching signature, integer times
inside the leeway, and the audience and issuer in the simple forms this service configures.
For anything else it answers None and the caller asks PyJWT, which gives the verdict and
the reason. So it can only make a valid token cheaper, never let through one PyJWT refuses:
tests/test_hmac_tokens.py holds it to that. `plain_header` reads the header of such a token
the same way, for choosing a key by `kid`.
"""

from __future__ import annotations

import binascii
import hmac
import re
import time
from base64 import urlsafe_b64decode, urlsafe_b64encode
from typing import Any, Final

import orjson
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidKeyError

_HASHES: Final = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}
_COMPACT: Final = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_PLAIN_HEADER: Final = frozenset({"alg", "typ", "kid"})
_REQUIRED: Final = ("exp", "iat", "sub")
# Real headers and claims hold a few objects and lists; these bounds only send oddities to PyJWT.
_MAX_CONTAINERS: Final = 64
_LONG_NUMBER: Final = re.compile(rb"\d{19}")


def _segment(encoded: bytes) -> bytes | None:
    """The bytes of one unpadded base64url segment, or None unless it is the canonical encoding."""
    try:
        decoded = urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))
    except binascii.Error:
        return None
    # Unused trailing bits must be zero: PyJWT refuses the other spellings of the same bytes.
    if urlsafe_b64encode(decoded).rstrip(b"=") != encoded:
        return None
    return decoded


def _json_object(data: bytes) -> dict[str, Any] | None:
    """The object, when orjson reads it exactly as the standard library would; else None.

    They differ on nesting (orjson allows 1024 levels, the standard library stops at the
    recursion limit) and on integers beyond 64 bits (orjson makes them floats): such JSON,
    and anything that merely looks like it, goes to PyJWT.
    """
    if data.count(b"[") + data.count(b"{") > _MAX_CONTAINERS or _LONG_NUMBER.search(data):
        return None
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _whole_seconds(value: object) -> bool:
    return type(value) is int


def _plain_parts(token: str) -> tuple[bytes, dict[str, Any], bytes, bytes] | None:
    """(signing input, header, payload bytes, signature bytes) of a token in plain form, else None.

    Every segment must decode as PyJWT decodes it; the payload is not parsed here.
    """
    if not token.isascii():
        return None
    raw = token.encode()
    if _COMPACT.fullmatch(raw) is None:
        return None
    signing_input, _, signature_segment = raw.rpartition(b".")
    header_segment, _, payload_segment = signing_input.partition(b".")
    header_bytes = _segment(header_segment)
    header = None if header_bytes is None else _json_object(header_bytes)
    # A null kid is not an absent one: PyJWT refuses it.
    if header is None or not _PLAIN_HEADER.issuperset(header) or not isinstance(header.get("kid", ""), str):
        return None
    payload, signature = _segment(payload_segment), _segment(signature_segment)
    if payload is None or signature is None:
        return None
    return signing_input, header, payload, signature


def plain_header(token: str) -> dict[str, Any] | None:
    """The header of a token in plain form (any algorithm), as `jwt.get_unverified_header` reads it; else None.

    For choosing a key by `kid` before the signature check, at a fraction of PyJWT's cost.
    """
    parts = _plain_parts(token)
    return None if parts is None else parts[1]


class HmacTokenCheck:
    """Claims of plainly valid HMAC-signed tokens; None where PyJWT must decide.

    Built with the same algorithms, audience, issuer and leeway the caller passes to
    `jwt.decode` with `require=["exp", "iat", "sub"]` and `strict_aud` when an audience is set.
    """

    def __init__(
        self, algorithms: tuple[str, ...], *, audience: str | None, issuer: str | None, leeway_s: float
    ) -> None:
        self._hashes = {alg: _HASHES[alg] for alg in algorithms if alg in _HASHES}
        self._audience = audience
        self._issuer = issuer
        self._leeway_s = leeway_s
        # Key text -> bytes, as PyJWT prepares it; None for a key PyJWT refuses (empty, PEM).
        self._keys: dict[str, bytes | None] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def claims(self, token: str, key: object) -> dict[str, Any] | None:
        if not isinstance(key, str):
            return None
        secret = self._key(key)
        parts = _plain_parts(token)
        if secret is None or parts is None:
            return None
        signing_input, header, payload, signature = parts
        alg = header.get("alg")
        digest = self._hashes.get(alg) if isinstance(alg, str) else None
        if digest is None or not hmac.compare_digest(hmac.digest(secret, signing_input, digest), signature):
            return None
        claims = _json_object(payload)
        if claims is None or not self._claims_valid(claims):
            return None
        return claims

    def _key(self, key: str) -> bytes | None:
        try:
            return self._keys[key]
        except KeyError:
            pass
        try:
            prepared: bytes | None = HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(key)
        except (InvalidKeyError, UnicodeError):
            # UnicodeError: a key with lone surrogates (from the environment) has no UTF-8 bytes.
            prepared = None
        self._keys[key] = prepared
        return prepared

    def _claims_valid(self, claims: dict[str, Any]) -> bool:
        if any(claims.get(name) is None for name in _REQUIRED):
            return False
        exp, iat = claims["exp"], claims["iat"]
        # Present but null is not the same as absent: PyJWT refuses it.
        nbf = claims.get("nbf", 0)
        if not (_whole_seconds(exp) and _whole_seconds(iat) and _whole_seconds(nbf)):
            return False
        now = time.time()
        if exp <= now - self._leeway_s or max(iat, nbf) > now + self._leeway_s:
            return False
        if not isinstance(claims["sub"], str) or not isinstance(claims.get("jti", ""), str):
            return False
        aud = claims.get("aud")
        if self._audience is None:
            if aud:
                return False
        elif not aud or aud != self._audience:
            # An empty `aud` is a missing one for PyJWT, even when the audience asked for is empty.
            return False
        return self._issuer is None or claims.get("iss") == self._issuer
