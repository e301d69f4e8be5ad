"""Revoked tokens: what a revocation names, the copy every verification checks, the store that keeps them.

A revocation names either every token of a user issued before a time, or one token by its
`jti`. It matters only while a token it names could still be valid: at most
MAX_TOKEN_LIFETIME_S (the longest lifetime a pod accepts) plus the clock leeway after the
newest token it names was issued. The store keeps it that long, so a pod that (re)starts
loads every revocation still in force; the running pods learn of new ones through the
control channel (service/control.py) and check tokens against their own copy, without a
round trip to the store.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Any

import orjson

from service.auth import MAX_JTI_LENGTH, MAX_TOKEN_LIFETIME_S, Principal
from service.protocol import is_valid_id


@dataclass(frozen=True, slots=True)
class Revocation:
    """Every token of `user_id` issued before `issued_before`, or the token whose jti is `jti`."""

    user_id: str | None = None
    # Unix seconds; tokens with `iat` strictly before it are refused.
    issued_before: int | None = None
    jti: str | None = None
    # Unix seconds after which no token it names can be valid any more.
    expires_at: float = 0.0

    @classmethod
    def of_user(cls, user_id: str, issued_before: int, *, leeway_s: int) -> Revocation:
        # A token issued just before `issued_before` is valid until MAX_TOKEN_LIFETIME_S later.
        return cls(
            user_id=user_id, issued_before=issued_before, expires_at=issued_before + MAX_TOKEN_LIFETIME_S + leeway_s
        )

    @classmethod
    def of_token(cls, jti: str, *, leeway_s: int, now: float | None = None) -> Revocation:
        # The token's own `exp` is unknown here: it was issued at the latest now.
        issued = time.time() if now is None else now
        return cls(jti=jti, expires_at=issued + MAX_TOKEN_LIFETIME_S + leeway_s)

    def to_json(self) -> dict[str, Any]:
        if self.jti is not None:
            return {"jti": self.jti, "expiresAt": self.expires_at}
        return {"userId": self.user_id, "issuedBefore": self.issued_before, "expiresAt": self.expires_at}

    @classmethod
    def from_json(cls, raw: object) -> Revocation:
        """The revocation `to_json` wrote; ValueError for anything else."""
        if not isinstance(raw, dict):
            raise ValueError("a revocation is an object")
        expires_at = raw.get("expiresAt")
        if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            raise ValueError("expiresAt must be a number")
        jti = raw.get("jti")
        if jti is not None:
            if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_LENGTH:
                raise ValueError("jti must be a short string")
            return cls(jti=jti, expires_at=float(expires_at))
        user_id, issued_before = raw.get("userId"), raw.get("issuedBefore")
        if not is_valid_id(user_id) or not isinstance(issued_before, int) or isinstance(issued_before, bool):
            raise ValueError("a revocation names a jti, or a userId and issuedBefore")
        return cls(user_id=user_id, issued_before=issued_before, expires_at=float(expires_at))

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())


class RevokedTokens:
    """This pod's copy of every revocation in force; `revokes` is two dict lookups."""

    def __init__(self) -> None:
        # user id -> (newest issued_before, when it stops mattering)
        self._users: dict[str, tuple[int, float]] = {}
        # jti -> when it stops mattering
        self._tokens: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._users) + len(self._tokens)

    def add(self, revocation: Revocation) -> None:
        if revocation.jti is not None:
            self._tokens[revocation.jti] = max(revocation.expires_at, self._tokens.get(revocation.jti, 0.0))
            return
        assert revocation.user_id is not None
        assert revocation.issued_before is not None
        known = self._users.get(revocation.user_id)
        if known is None or revocation.issued_before > known[0]:
            self._users[revocation.user_id] = (revocation.issued_before, revocation.expires_at)

    def revokes(self, principal: Principal) -> bool:
        """Whether a verified token is revoked."""
        if not self._users and not self._tokens:
            return False
        user = self._users.get(principal.user_id)
        if user is not None and principal.issued_at < user[0]:
            return True
        return principal.token_id is not None and principal.token_id in self._tokens

    def prune(self, now: float | None = None) -> None:
        """Forget revocations no valid token can match any more."""
        now = time.time() if now is None else now
        self._users = {user: entry for user, entry in self._users.items() if entry[1] > now}
        self._tokens = {jti: until for jti, until in self._tokens.items() if until > now}


class RevocationStore(abc.ABC):
    """Where revocations outlive the pods: each is kept until its `expires_at`."""

    @abc.abstractmethod
    async def add(self, revocation: Revocation) -> None:
        """Keep a revocation; raise BackendUnavailable when the store cannot take it now."""

    @abc.abstractmethod
    async def load(self) -> list[Revocation]:
        """Every revocation still in force; raise BackendUnavailable when the store cannot answer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; idempotent."""


class MemoryRevocationStore(RevocationStore):
    """The embedded broker's store: one process, so revocations live as long as it does."""

    def __init__(self) -> None:
        self._revocations: list[Revocation] = []

    async def add(self, revocation: Revocation) -> None:
        now = time.time()
        self._revocations = [r for r in self._revocations if r.expires_at > now]
        self._revocations.append(revocation)

    async def load(self) -> list[Revocation]:
        now = time.time()
        return [r for r in self._revocations if r.expires_at > now]

    async def close(self) -> None:
        pass
