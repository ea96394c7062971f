"""Compact JWS (RFC 7515) signing and verification of Kernex messages.

PyJWT signs. Verification parses the compact form itself and calls `cryptography` directly:
PyJWT 2.x checks every base64url character in a Python generator and parses each token twice
(header, then decode), which cost ingest a third of its CPU (docs/performance.md). The parsing
is as strict as PyJWT's: exactly three segments of unpadded, canonical base64url, a JSON object
header. The algorithm is pinned to the verifying key's type (ES256, RS256 or EdDSA), so
`alg: none` and RSA/HMAC key confusion can never verify. ES256 signatures are raw r||s
(RFC 7518 section 3.4), which PyJWT produces and this module expects.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from jwt.api_jws import PyJWS

from kernex.protocol.exceptions import SignatureError
from kernex.protocol.keys import PrivateKey, PublicKey, jws_algorithm

TYP_HEARTBEAT = "kernex-heartbeat+jws"
TYP_EVENT = "kernex-event+jws"
TYP_COMMAND = "kernex-command+jws"

# One instance: PyJWS keeps an algorithm registry and is safe to share between threads.
_JWS = PyJWS()
# Unpadded base64url (RFC 7515 section 2): one C-speed match instead of a per-character check.
_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")
_SEGMENTS = 3  # header.payload.signature
ES256_SIGNATURE_BYTES = 64  # raw r||s, 32 bytes each
# Immutable, so one is shared: building one per check cost 3 us, 2 % of an ES256 check.
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True, slots=True)
class ParsedJWS:
    """A well-formed compact JWS, not verified yet: its header picks the key, then verify() it.

    Callers that read the header first pass this to verify() instead of the token, so a token
    is parsed once (ingest checks the kid of every message before its signature).
    """

    header: dict[str, Any]
    signing_input: bytes
    payload_segment: bytes
    signature: bytes


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
    return parse(token).header


def verify(token: str | bytes | ParsedJWS, key: PublicKey) -> VerifiedJWS:
    """Verify a compact JWS with the key; the header's `alg` must be the key's algorithm."""
    parsed = token if isinstance(token, ParsedJWS) else parse(token)
    header = parsed.header
    if header.get("alg") != jws_algorithm(key):
        raise SignatureError("The specified alg value is not allowed")
    if "crit" in header or header.get("b64", True) is not True:
        # RFC 7515 section 4.1.11: extensions we do not implement (e.g. RFC 7797) must fail.
        raise SignatureError("JWS extensions (crit, b64) are not accepted")
    try:
        _check_signature(key, parsed.signature, parsed.signing_input)
    except InvalidSignature:
        raise SignatureError("Signature verification failed") from None
    return VerifiedJWS(header=header, payload=_b64decode(parsed.payload_segment, "payload"))


def parse(token: str | bytes) -> ParsedJWS:
    """Split and decode a well-formed compact JWS without verifying it; raises SignatureError."""
    if isinstance(token, str):
        try:
            token = token.encode("ascii")
        except UnicodeEncodeError:
            raise SignatureError("malformed JWS: not ASCII") from None
    if not isinstance(token, bytes):
        raise SignatureError("malformed JWS: a token is text or bytes")
    parts = token.split(b".")
    if len(parts) != _SEGMENTS:
        raise SignatureError("malformed JWS: Not enough segments")
    header_segment, payload_segment, signature_segment = parts
    try:
        header = json.loads(_b64decode(header_segment, "header"))
    except (ValueError, RecursionError) as exc:
        raise SignatureError(f"malformed JWS: Invalid header string: {exc}") from None
    if not isinstance(header, dict):
        raise SignatureError("malformed JWS: Invalid header string: must be a json object")
    if "kid" in header and not isinstance(header["kid"], str):
        raise SignatureError("malformed JWS: Key ID header parameter must be a string")
    signing_input = token[: len(header_segment) + 1 + len(payload_segment)]
    return ParsedJWS(header, signing_input, payload_segment, _b64decode(signature_segment, "signature"))


def _b64decode(segment: bytes, name: str) -> bytes:
    # len % 4 == 1 can never be base64; re-encoding must give the segment back, which refuses
    # non-zero trailing bits (two spellings of one signature would defeat deduplication).
    if len(segment) % 4 == 1 or not _BASE64URL.fullmatch(segment):
        raise SignatureError(f"malformed JWS: Invalid {name} padding")
    try:
        decoded = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise SignatureError(f"malformed JWS: Invalid {name} padding") from None
    if base64.urlsafe_b64encode(decoded).rstrip(b"=") != segment:
        raise SignatureError(f"malformed JWS: Invalid {name} padding")
    return decoded


def _check_signature(key: PublicKey, signature: bytes, signing_input: bytes) -> None:
    """Raises InvalidSignature unless `signature` is the key's signature of `signing_input`."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if len(signature) != ES256_SIGNATURE_BYTES:
            raise InvalidSignature
        half = ES256_SIGNATURE_BYTES // 2
        r = int.from_bytes(signature[:half], "big")
        s = int.from_bytes(signature[half:], "big")
        key.verify(utils.encode_dss_signature(r, s), signing_input, _ECDSA_SHA256)
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    else:
        assert isinstance(key, ed25519.Ed25519PublicKey)
        key.verify(signature, signing_input)
