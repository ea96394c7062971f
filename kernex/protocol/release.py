"""Release signatures: a release key vouches for a bundle (DESIGN.md "Bundles").

A release signature is a compact JWS (typ `kernex-release+jws`) over the bundle's name,
version, the SHA-256 of its manifest and the SHA-256 of the whole archive. The server signs
uploads with its release key, or verifies a signature made offline (`kernex bundle sign`)
against its trusted release keys; agents verify against the release keys they pinned at
registration, before extracting anything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from kernex.protocol import jws
from kernex.protocol.exceptions import SignatureError
from kernex.protocol.keys import PrivateKey, PublicKey, public_key_fingerprint

TYP_RELEASE = "kernex-release+jws"
RELEASE_KEY_ID_PREFIX = "rel-"
RELEASE_KEY_ID_HEX_CHARS = 16  # 64 bits of SPKI SHA-256: unique among the few keys a device pins


def release_key_id(public_key: PublicKey) -> str:
    """The kid of a release key: "rel-" and 16 hex characters of its SPKI SHA-256."""
    return RELEASE_KEY_ID_PREFIX + public_key_fingerprint(public_key)[:RELEASE_KEY_ID_HEX_CHARS]


class ReleaseClaims(BaseModel):
    """What a release signature asserts."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    version: str
    manifest_sha256: str
    archive_sha256: str


def sign_release(claims: ReleaseClaims, key: PrivateKey, key_id: str) -> str:
    """Sign a release with a release key."""
    return jws.sign_claims(claims.model_dump(), key, kid=key_id, typ=TYP_RELEASE)


def verify_release(signature: str, trusted: Mapping[str, PublicKey]) -> tuple[str, ReleaseClaims]:
    """Verify against trusted release keys by kid; returns the signing kid and the claims."""
    parsed = jws.parse(signature)
    header = parsed.header
    if header.get("typ") != TYP_RELEASE:
        raise SignatureError("not a release signature")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in trusted:
        raise SignatureError(f"release signed by unknown key {kid!r}")
    verified = jws.verify(parsed, trusted[kid])
    try:
        return kid, ReleaseClaims.model_validate(json.loads(verified.payload))
    except (ValueError, ValidationError) as exc:
        raise SignatureError(f"malformed release claims: {exc}") from None


def check_release(
    claims: ReleaseClaims, *, name: str, version: str, manifest_sha256: str, archive_sha256: str
) -> None:
    """The signature must be for exactly this bundle."""
    expected = ReleaseClaims(
        name=name, version=version, manifest_sha256=manifest_sha256, archive_sha256=archive_sha256
    )
    if claims != expected:
        raise SignatureError("release signature is for a different bundle")
