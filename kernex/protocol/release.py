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
from kernex.protocol.keys import PrivateKey, PublicKey

TYP_RELEASE = "kernex-release+jws"


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
    header = jws.unverified_header(signature)
    if header.get("typ") != TYP_RELEASE:
        raise SignatureError("not a release signature")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in trusted:
        raise SignatureError(f"release signed by unknown key {kid!r}")
    verified = jws.verify(signature, trusted[kid])
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
