"""The fleet PKI: idempotent init, private files, device certificates, passphrase, CLI."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from kernex.broker.exceptions import PKIError
from kernex.broker.pki import API_IDENTITY, CLOCK_SKEW, INGEST_IDENTITY, FleetPKI
from kernex.broker.settings import BrokerSettings
from kernex.cli.main import app
from kernex.kit.settings import Environment
from kernex.protocol import jws
from kernex.protocol.keys import KeyType, build_csr, generate_private_key, load_public_key_pem
from tests.fixtures.broker import TEST_PKI_PASSPHRASE

PASSPHRASE = b"correct horse battery staple"


def _load_csr(pem: str) -> x509.CertificateSigningRequest:
    return x509.load_pem_x509_csr(pem.encode("ascii"))


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


@pytest.fixture
def fresh(tmp_path: Path) -> FleetPKI:
    return FleetPKI(tmp_path / "pki", PASSPHRASE)


def test_init_is_idempotent_and_keeps_the_ca(fresh: FleetPKI) -> None:
    initialized = [fresh.is_initialized]
    assert fresh.init() is True
    initialized.append(fresh.is_initialized)
    assert initialized == [False, True]
    ca_before = _cert(fresh.ca_cert_path).fingerprint(hashes.SHA256())
    broker_before = fresh.broker_cert_path.read_bytes()
    kid_before = fresh.command_key_id

    again = FleetPKI(fresh.directory, PASSPHRASE)
    assert again.init() is False
    assert _cert(again.ca_cert_path).fingerprint(hashes.SHA256()) == ca_before
    assert again.broker_cert_path.read_bytes() == broker_before
    assert again.command_key_id == kid_before


def test_ca_and_service_certificates(fresh: FleetPKI) -> None:
    fresh.init(["localhost", "127.0.0.1", "mqtt.example.com"])
    ca = _cert(fresh.ca_cert_path)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= timedelta(days=3650)
    # The CA key is encrypted at rest; the TLS keys are not (Mosquitto and paho read them).
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(fresh.ca_key_path.read_bytes(), password=None)
    serialization.load_pem_private_key(fresh.broker_key_path.read_bytes(), password=None)

    broker = _cert(fresh.broker_cert_path)
    broker.verify_directly_issued_by(ca)
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "mqtt.example.com"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = broker.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    for name in (INGEST_IDENTITY, API_IDENTITY):
        cert = _cert(fresh.service_cert_path(name))
        cert.verify_directly_issued_by(ca)
        assert _cn(cert) == name
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_new_broker_host_reissues_only_the_broker_certificate(fresh: FleetPKI) -> None:
    fresh.init()
    ca = fresh.ca_cert_path.read_bytes()
    ingest = fresh.service_cert_path(INGEST_IDENTITY).read_bytes()
    assert fresh.init(["localhost", "127.0.0.1", "broker.fleet.test"]) is True
    san = _cert(fresh.broker_cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "broker.fleet.test" in san.value.get_values_for_type(x509.DNSName)
    assert fresh.ca_cert_path.read_bytes() == ca
    assert fresh.service_cert_path(INGEST_IDENTITY).read_bytes() == ingest


def test_files_are_0600_and_directories_0700(fresh: FleetPKI) -> None:
    fresh.init()
    fresh.issue_client_certificate("integrator-1")
    entries = [fresh.directory, *fresh.directory.rglob("*")]
    assert len(entries) > 10
    for path in entries:
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = 0o700 if path.is_dir() else 0o600
        assert mode == expected, f"{path} has mode {mode:o}"


def test_device_cn_is_the_device_id_whatever_the_csr_asks(pki: FleetPKI) -> None:
    key = generate_private_key(KeyType.ECDSA_P256)
    # The CSR asks to be the ingest service: the CN must come from the caller, not the CSR.
    csr = _load_csr(build_csr(key, INGEST_IDENTITY))
    before = datetime.now(UTC)
    issued = pki.sign_device_csr(csr, "device-0001", validity=timedelta(days=7))

    cert = x509.load_pem_x509_certificate(issued.pem.encode("ascii"))
    assert [a.value for a in cert.subject] == ["device-0001"]
    cert.verify_directly_issued_by(_cert(pki.ca_cert_path))
    assert cert.public_key() == key.public_key()
    assert issued.serial == f"{cert.serial_number:x}"
    assert issued.not_after == cert.not_valid_after_utc
    assert timedelta(days=6) < issued.not_after - before <= timedelta(days=7, seconds=5)
    # Backdated for device clocks that lag.
    assert before - cert.not_valid_before_utc >= CLOCK_SKEW - timedelta(seconds=5)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_serials_are_random_and_unique(pki: FleetPKI) -> None:
    csr = _load_csr(build_csr(generate_private_key(KeyType.ECDSA_P256), "x"))
    serials = {pki.sign_device_csr(csr, "device-serials").serial for _ in range(5)}
    assert len(serials) == 5
    assert all(len(s) > 30 for s in serials)  # random_serial_number: 159 random bits


@pytest.mark.parametrize("key_type", list(KeyType))
def test_every_device_key_type_is_signable(pki: FleetPKI, key_type: KeyType) -> None:
    key = generate_private_key(key_type)
    issued = pki.sign_device_csr(_load_csr(build_csr(key, "ignored")), f"dev-{key_type.value}")
    cert = x509.load_pem_x509_certificate(issued.pem.encode("ascii"))
    assert cert.public_key() == key.public_key()
    assert _cn(cert) == f"dev-{key_type.value}"


@pytest.mark.parametrize(
    "device_id", ["", "a/b", "dev+", "dev#", "has space", INGEST_IDENTITY, API_IDENTITY, "x" * 65]
)
def test_unsafe_or_reserved_device_ids_are_refused(pki: FleetPKI, device_id: str) -> None:
    csr = _load_csr(build_csr(generate_private_key(KeyType.ECDSA_P256), "x"))
    with pytest.raises(PKIError):
        pki.sign_device_csr(csr, device_id)


def test_a_csr_with_a_broken_signature_is_refused(pki: FleetPKI) -> None:
    der = bytearray(
        _load_csr(build_csr(generate_private_key(KeyType.ECDSA_P256), "x")).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-3] ^= 0x01  # inside the ECDSA signature's last INTEGER
    csr = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(PKIError, match="signature"):
        pki.sign_device_csr(csr, "device-forged")


def test_wrong_passphrase_is_a_clear_pki_error(pki: FleetPKI) -> None:
    locked = FleetPKI(pki.directory, b"not the passphrase")
    csr = _load_csr(build_csr(generate_private_key(KeyType.ECDSA_P256), "x"))
    with pytest.raises(PKIError, match="wrong PKI passphrase"):
        locked.sign_device_csr(csr, "device-1")
    with pytest.raises(PKIError, match="wrong PKI passphrase"):
        locked.init()
    with pytest.raises(PKIError, match="wrong PKI passphrase"):
        locked.command_signing_key()


def test_command_signing_key_signs_what_devices_verify(pki: FleetPKI) -> None:
    token = jws.sign_claims(
        {"command_id": "c1"}, pki.command_signing_key(), kid=pki.command_key_id, typ=jws.TYP_COMMAND
    )
    verified = jws.verify(token, load_public_key_pem(pki.command_public_key_pem))
    assert verified.header["kid"] == pki.command_key_id
    assert pki.command_key_id.startswith("cp-")
    assert len(pki.command_key_id) == 3 + 16
    # Encrypted at rest, like the CA key: a copied directory alone cannot command the fleet.
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(pki.command_key_path.read_bytes(), password=None)


def test_issue_client_certificate_into_a_directory(pki: FleetPKI, tmp_path: Path) -> None:
    cert_path, key_path = pki.issue_client_certificate("integrator-a", tmp_path / "out", timedelta(days=2))
    assert cert_path == tmp_path / "out" / "integrator-a.crt"
    cert = _cert(cert_path)
    assert _cn(cert) == "integrator-a"
    private = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert private.public_key() == cert.public_key()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    with pytest.raises(PKIError):
        pki.issue_client_certificate("../escape")


def test_development_passphrase_is_generated_once_and_reused(tmp_path: Path) -> None:
    settings = BrokerSettings(data_dir=tmp_path, environment=Environment.DEVELOPMENT)
    first = FleetPKI.from_settings(settings)
    assert first.init()
    secret = tmp_path / "secrets" / "pki-passphrase"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(secret.read_bytes().strip()) >= 32
    second = FleetPKI.from_settings(settings)
    assert second.directory == settings.pki_dir
    assert second.init() is False  # decrypts the CA key with the same generated passphrase


def test_configured_passphrase_is_used(tmp_path: Path) -> None:
    settings = BrokerSettings(
        data_dir=tmp_path, pki_passphrase=TEST_PKI_PASSPHRASE.decode(), environment=Environment.DEVELOPMENT
    )
    FleetPKI.from_settings(settings).init()
    assert not (tmp_path / "secrets").exists()
    FleetPKI(settings.pki_dir, TEST_PKI_PASSPHRASE).command_signing_key()


def test_cli_pki_init(tmp_path: Path) -> None:
    runner = CliRunner()
    # None unsets a variable the surrounding environment might set.
    env: dict[str, str | None] = {
        "KERNEX_DATA_DIR": str(tmp_path),
        "KERNEX_ENVIRONMENT": "development",
        "KERNEX_PKI_PASSPHRASE": None,
    }
    first = runner.invoke(app, ["pki", "init"], env=env)
    assert first.exit_code == 0, first.output
    assert str(tmp_path / "pki" / "ca.crt") in first.stdout
    assert "already initialized" not in first.stdout
    second = runner.invoke(app, ["pki", "init"], env=env)
    assert second.exit_code == 0
    assert "already initialized" in second.stdout

    wrong = runner.invoke(app, ["pki", "init"], env={**env, "KERNEX_PKI_PASSPHRASE": "a wrong passphrase"})
    assert wrong.exit_code == 1
    assert wrong.stderr.count("\n") == 1
    assert wrong.stderr.startswith("error: cannot decrypt the fleet CA key")
    assert wrong.exception is None or isinstance(wrong.exception, SystemExit)
