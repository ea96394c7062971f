"""Device and control-plane keys: generation, PEM (de)serialisation, device ids, JWS algorithms."""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from kernex.protocol.exceptions import InvalidCSRError, InvalidKeyError

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

RSA_MIN_BITS = 2048  # NIST SP 800-131A: RSA below 2048 bits is disallowed for signatures
RSA_GENERATE_BITS = 4096  # DESIGN.md: devices that choose RSA use RSA-4096
DEVICE_ID_HEX_CHARS = 32  # 128 bits of SHA-256: collision-free for any fleet, short enough for a CN


class KeyType(StrEnum):
    """The key types a device may hold (DESIGN.md "Identity and trust")."""

    ECDSA_P256 = "ecdsa-p256"
    RSA_4096 = "rsa-4096"
    ED25519 = "ed25519"


def generate_private_key(key_type: KeyType) -> PrivateKey:
    """Create a new private key of the given type."""
    if key_type is KeyType.ECDSA_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.RSA_4096:
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_GENERATE_BITS)
    return ed25519.Ed25519PrivateKey.generate()


def check_public_key(key: object) -> PublicKey:
    """Return the key if Kernex accepts it for signing, or raise InvalidKeyError saying why."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise InvalidKeyError(f"EC keys must use curve P-256, not {key.curve.name}")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < RSA_MIN_BITS:
            raise InvalidKeyError(f"RSA keys must have at least {RSA_MIN_BITS} bits, got {key.key_size}")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise InvalidKeyError(f"unsupported key type {type(key).__name__}: use ECDSA P-256, RSA or Ed25519")


def key_type_of(key: PublicKey) -> KeyType:
    """The KeyType naming this public key (RSA of any accepted size reports as rsa-4096's family)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return KeyType.ECDSA_P256
    if isinstance(key, rsa.RSAPublicKey):
        return KeyType.RSA_4096
    return KeyType.ED25519


def jws_algorithm(key: PublicKey | PrivateKey) -> str:
    """The one JWS algorithm allowed for this key: pinning it rules out `none` and key confusion."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return "ES256"
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return "RS256"
    return "EdDSA"


def private_key_to_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: the agent protects the file with mode 0600."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_to_pem(key: PublicKey) -> str:
    """SubjectPublicKeyInfo PEM."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_private_key_pem(data: bytes) -> PrivateKey:
    """Load a PEM private key of an accepted type."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidKeyError(f"cannot load private key: {exc}") from None
    check_public_key(key.public_key())
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey)
    return key


def load_public_key_pem(data: str | bytes) -> PublicKey:
    """Load a PEM SubjectPublicKeyInfo of an accepted type."""
    raw = data.encode("ascii") if isinstance(data, str) else data
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidKeyError(f"cannot load public key: {exc}") from None
    return check_public_key(key)


def public_key_fingerprint(key: PublicKey) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, lowercase hex."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def device_id_for(key: PublicKey) -> str:
    """The device id: derived from the public key, so the same key always names the same device.

    Hex keeps it safe as an MQTT topic level and as a certificate CN (no `+`, `#` or `/`).
    """
    return public_key_fingerprint(key)[:DEVICE_ID_HEX_CHARS]


def build_csr(key: PrivateKey, common_name: str) -> str:
    """A PEM CSR signed with the key: the proof of possession sent at registration."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode("ascii")


def load_csr(pem: str) -> tuple[x509.CertificateSigningRequest, PublicKey]:
    """Parse a PEM CSR, check its self-signature and its key; return it with its public key."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode("utf-8"))
    except ValueError as exc:
        raise InvalidCSRError(f"malformed CSR: {exc}") from None
    try:
        public_key = check_public_key(csr.public_key())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidCSRError(f"unsupported CSR key: {exc}") from None
    except InvalidKeyError as exc:
        raise InvalidCSRError(str(exc)) from None
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        valid = False
    if not valid:
        raise InvalidCSRError("CSR signature does not verify: it must be signed by the key it carries")
    return csr, public_key
