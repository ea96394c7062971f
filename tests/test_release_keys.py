"""The release key: generated into the PKI, encrypted with the passphrase, apart from every other key."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from kernex.api.bundles.keyring import load_keyring
from kernex.broker.exceptions import PKIError
from kernex.broker.pki import FleetPKI
from kernex.protocol.keys import KeyType, generate_private_key, public_key_fingerprint, public_key_to_pem
from kernex.protocol.release import ReleaseClaims, release_key_id

CLAIMS = ReleaseClaims(name="b", version="1.0.0", manifest_sha256="a" * 64, archive_sha256="b" * 64)


def test_release_key_is_generated_encrypted_and_distinct(tmp_path: Path) -> None:
    pki = FleetPKI(tmp_path / "pki", b"release-key-test-passphrase")
    assert pki.init()
    pem = pki.release_key_path.read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    assert pki.release_key_path.stat().st_mode & 0o777 == 0o600
    key = pki.release_signing_key()
    assert isinstance(key.curve, ec.SECP256R1)
    assert public_key_fingerprint(key.public_key()) != public_key_fingerprint(pki.command_public_key)
    assert pki.release_key_id == "rel-" + public_key_fingerprint(key.public_key())[:16]
    assert not pki.init()  # idempotent: the key is kept

    with pytest.raises(PKIError, match="passphrase"):
        FleetPKI(tmp_path / "pki", b"wrong passphrase").release_signing_key()
    pki.release_key_path.unlink()
    assert not pki.is_initialized


def test_keyring_signs_and_trusts_configured_keys(tmp_path: Path) -> None:
    pki = FleetPKI(tmp_path / "pki", b"release-key-test-passphrase")
    pki.init()
    offline = generate_private_key(KeyType.ECDSA_P256)
    trusted = tmp_path / "offline.pub"
    trusted.write_text(public_key_to_pem(offline.public_key()))
    keyring = load_keyring(pki, [trusted])
    assert list(keyring.trusted) == [pki.release_key_id, release_key_id(offline.public_key())]
    assert [k.alg for k in keyring.public_keys()] == ["ES256", "ES256"]
    assert keyring.verify(keyring.sign(CLAIMS)) == (pki.release_key_id, CLAIMS)

    ed = tmp_path / "ed.pub"
    ed.write_text(public_key_to_pem(generate_private_key(KeyType.ED25519).public_key()))
    with pytest.raises(PKIError, match="P-256"):
        load_keyring(pki, [ed])
    with pytest.raises(PKIError, match=r"missing\.pub"):
        load_keyring(pki, [tmp_path / "missing.pub"])
