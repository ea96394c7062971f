"""Short-lived JWTs a device signs itself to call the REST API (DESIGN.md "Message format")."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt

from kernex.protocol.exceptions import SignatureError
from kernex.protocol.keys import PrivateKey, PublicKey, jws_algorithm

DEVICE_TOKEN_AUDIENCE = "kernex-api"  # noqa: S105 - an audience name, not a secret
DEVICE_TOKEN_MAX_LIFETIME_S = 300  # DESIGN.md: exp at most 5 minutes after iat
DEVICE_TOKEN_TYP = "kernex-device+jwt"  # noqa: S105 - a JOSE typ, not a secret
LEEWAY_S = 30  # tolerate small clock drift between device and server


def issue(key: PrivateKey, device_id: str, lifetime_s: int = 120) -> str:
    """A device JWT: iss = sub = device id, aud = kernex-api."""
    now = int(time.time())
    claims = {
        "iss": device_id,
        "sub": device_id,
        "aud": DEVICE_TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + min(lifetime_s, DEVICE_TOKEN_MAX_LIFETIME_S),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(
        claims, key, algorithm=jws_algorithm(key), headers={"kid": device_id, "typ": DEVICE_TOKEN_TYP}
    )


def verify(token: str, key_for: Callable[[str], PublicKey]) -> str:
    """Verify a device JWT and return its device id; key_for looks up a device's key by id."""
    try:
        header = jwt.get_unverified_header(token)
        if header.get("typ") != DEVICE_TOKEN_TYP:
            raise SignatureError("not a device token")
        claims_peek: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
        device_id = claims_peek.get("sub")
        if not isinstance(device_id, str) or header.get("kid") != device_id:
            raise SignatureError("device token kid and sub must both name the device")
        key = key_for(device_id)
        claims = jwt.decode(
            token,
            key,
            algorithms=[jws_algorithm(key)],
            audience=DEVICE_TOKEN_AUDIENCE,
            issuer=device_id,
            leeway=LEEWAY_S,
            options={"require": ["exp", "iat", "iss", "sub", "aud"]},
        )
    except jwt.PyJWTError as exc:
        raise SignatureError(f"invalid device token: {exc}") from None
    if int(claims["exp"]) - int(claims["iat"]) > DEVICE_TOKEN_MAX_LIFETIME_S:
        raise SignatureError("device token lifetime exceeds 5 minutes")
    return device_id
