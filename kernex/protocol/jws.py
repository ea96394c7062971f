"""Compact JWS (RFC 7515) signing and verification of Kernex messages.

PyJWT does the cryptography; this module pins the algorithm to the verifying key's type
(ES256, RS256 or EdDSA) so `alg: none` and RSA/HMAC key confusion can never verify.
ES256 signatures are raw r||s (RFC 7518 section 3.4), which PyJWT produces and expects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.api_jws import PyJWS

from kernex.protocol.exceptions import SignatureError
from kernex.protocol.keys import PrivateKey, PublicKey, jws_algorithm

TYP_HEARTBEAT = "kernex-heartbeat+jws"
TYP_EVENT = "kernex-event+jws"
TYP_COMMAND = "kernex-command+jws"

# One instance: PyJWS keeps an algorithm registry and is safe to share between threads.
_JWS = PyJWS()


@dataclass(frozen=True, slots=True)
class VerifiedJWS:
    """A JWS whose signature verified: its protected header and raw payload."""

    header: dict[str, Any]
    payload: bytes


def sign(payload: bytes, key: PrivateKey, *, kid: str, typ: str) -> str:
    """Sign raw payload bytes; returns the compact serialisation."""
    return _JWS.encode(payload, key, algorithm=jws_algorithm(key), headers={"kid": kid, "typ": typ})


def sign_claims(claims: dict[str, Any], key: PrivateKey, *, kid: str, typ: str) -> str:
    """Serialise claims as compact JSON and sign them."""
    payload = json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return sign(payload, key, kid=kid, typ=typ)


def unverified_header(token: str | bytes) -> dict[str, Any]:
    """The header of a JWS before verification, used only to pick the key to verify with."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise SignatureError(f"malformed JWS: {exc}") from None
    return header


def verify(token: str | bytes, key: PublicKey) -> VerifiedJWS:
    """Verify a compact JWS with the key; the header's `alg` must be the key's algorithm."""
    try:
        decoded = _JWS.decode_complete(token, key, algorithms=[jws_algorithm(key)])
    except jwt.PyJWTError as exc:
        raise SignatureError(str(exc) or type(exc).__name__) from None
    payload = decoded["payload"]
    header = decoded["header"]
    assert isinstance(payload, bytes)
    assert isinstance(header, dict)
    return VerifiedJWS(header=header, payload=payload)
