"""Operator access tokens: HS256 JWTs the API issues at login and verifies on every request.

The algorithm is pinned here, never taken from a token's header: `alg: none`, RS/ES tokens and
key-confusion tricks all fail the same `algorithms=[ALGORITHM]` check. The audience differs from
the one devices sign for (`kernex-api`), and the `typ` header differs too, so neither kind of
token can stand in for the other.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt

from kernex.api.errors import UnauthorizedError

ALGORITHM = "HS256"
OPERATOR_AUDIENCE = "kernex-operators"
ISSUER = "kernex"
OPERATOR_TOKEN_TYP = "kernex-operator+jwt"  # noqa: S105 - a JOSE typ, not a secret
REQUIRED_CLAIMS = ("exp", "iat", "sub", "aud", "iss", "jti")
# API processes behind one load balancer may disagree on the time by a little; not by minutes.
LEEWAY_S = 5


@dataclass(frozen=True)
class AccessToken:
    """An issued token and when it expires."""

    token: str
    jti: str
    expires_at: datetime


@dataclass(frozen=True)
class AccessClaims:
    """What a verified access token says."""

    user_id: str
    jti: str
    token_version: int
    expires_at: datetime


def issue(secret: str, *, user_id: str, token_version: int, ttl_s: int) -> AccessToken:
    """Sign an access token for the user, valid for ttl_s seconds."""
    now = int(time.time())
    jti = uuid.uuid4().hex
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": user_id,
        "aud": OPERATOR_AUDIENCE,
        "iat": now,
        "exp": now + ttl_s,
        "jti": jti,
        # Bumped on the user row by logout-everywhere, password change and disabling.
        "ver": token_version,
    }
    token = jwt.encode(claims, secret, algorithm=ALGORITHM, headers={"typ": OPERATOR_TOKEN_TYP})
    return AccessToken(token=token, jti=jti, expires_at=datetime.fromtimestamp(now + ttl_s, UTC))


def verify(secret: str, token: str) -> AccessClaims:
    """Check signature, algorithm, audience, issuer, expiry and claims; UnauthorizedError if any fails."""
    try:
        if jwt.get_unverified_header(token).get("typ") != OPERATOR_TOKEN_TYP:
            raise UnauthorizedError("not an operator access token")
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=OPERATOR_AUDIENCE,
            issuer=ISSUER,
            leeway=LEEWAY_S,
            options={"require": list(REQUIRED_CLAIMS)},
        )
    except jwt.PyJWTError as exc:
        raise UnauthorizedError(f"invalid access token: {exc}") from None
    sub, jti, version = claims["sub"], claims["jti"], claims.get("ver", 0)
    if not isinstance(sub, str) or not isinstance(jti, str) or not isinstance(version, int):
        raise UnauthorizedError("invalid access token: malformed claims")
    return AccessClaims(
        user_id=sub,
        jti=jti,
        token_version=version,
        expires_at=datetime.fromtimestamp(int(claims["exp"]), UTC),
    )
