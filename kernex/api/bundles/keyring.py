"""Release keys: the server's own (signs uploads) and the trusted offline ones (verify uploads)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from kernex.broker.exceptions import PKIError
from kernex.broker.pki import FleetPKI
from kernex.protocol.exceptions import InvalidKeyError
from kernex.protocol.keys import PublicKey, load_public_key_pem, public_key_to_pem
from kernex.protocol.messages import CommandKey
from kernex.protocol.release import ReleaseClaims, release_key_id, sign_release, verify_release

RELEASE_ALG = "ES256"  # the wire contract: release keys are ECDSA P-256


@dataclass(frozen=True)
class ReleaseKeyring:
    """The server's release key and every key whose release signatures are accepted."""

    key_id: str
    signing_key: ec.EllipticCurvePrivateKey
    trusted: Mapping[str, PublicKey]

    def sign(self, claims: ReleaseClaims) -> str:
        """A release signature by the server's key."""
        return sign_release(claims, self.signing_key, self.key_id)

    def verify(self, signature: str) -> tuple[str, ReleaseClaims]:
        """The signing kid and claims of a signature by a trusted key; SignatureError otherwise."""
        return verify_release(signature, self.trusted)

    def public_keys(self) -> list[CommandKey]:
        """What registration tells devices to pin: the server's key first, then the trusted ones."""
        return [
            CommandKey(kid=kid, alg=RELEASE_ALG, public_key_pem=public_key_to_pem(key))
            for kid, key in self.trusted.items()
        ]


def load_keyring(pki: FleetPKI, trusted_paths: Sequence[Path]) -> ReleaseKeyring:
    """Unlock the server's release key and load the trusted ones (blocking: a KDF and file reads)."""
    signing_key = pki.release_signing_key()
    own_id = release_key_id(signing_key.public_key())
    trusted: dict[str, PublicKey] = {own_id: signing_key.public_key()}
    for path in trusted_paths:
        try:
            key = load_public_key_pem(path.read_bytes())
        except OSError as exc:
            raise PKIError(f"trusted release key {path}: {exc.strerror}") from None
        except InvalidKeyError as exc:
            raise PKIError(f"trusted release key {path}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise PKIError(f"trusted release key {path}: release keys must be ECDSA P-256 ({RELEASE_ALG})")
        trusted[release_key_id(key)] = key
    return ReleaseKeyring(key_id=own_id, signing_key=signing_key, trusted=trusted)
