"""Token checks shared by the Python peers, matching what eva-ws checks (HS256, exp, customer claims)."""

from __future__ import annotations

import os
from typing import Final

import jwt

SECRET_ENV: Final = "BENCH_JWT_SECRET"


def secret_from_env() -> str:
    """The HMAC secret; it comes through the environment so it never shows in `ps`."""
    return os.environ[SECRET_ENV]


def allowed_customers(token: str, secret: str) -> frozenset[str] | None:
    """Customer ids the token may read, or None when the token is missing, forged or expired."""
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
    except jwt.InvalidTokenError:
        return None
    ids = claims.get("customerIds") or ([claims["customerId"]] if "customerId" in claims else [])
    return frozenset(str(c) for c in ids)
