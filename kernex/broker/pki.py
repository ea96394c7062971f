"""The fleet PKI: the CA that issues device and service certificates, and the command-signing key.

Layout of the PKI directory (0700; every file 0600, written atomically):

    ca.crt, ca.key              fleet CA; the key is encrypted with the PKI passphrase
    broker.crt, broker.key      Mosquitto's server certificate (SAN: the broker's host names)
    services/<name>.crt|.key    client certificates of kernex-ingest, kernex-api and integrators
    command-signing.key         control-plane key that signs commands; encrypted with the passphrase
    command-keys.json, command-keys/<kid>.key
                                the command key ring once rotated (kernex.broker.command_keys)
    release-signing.key         release key that signs bundle manifests; encrypted with the passphrase

Mosquitto and paho read the TLS keys from files and cannot decrypt them, so those stay
unencrypted and rely on their mode. The CA key, the command-signing key and the release key are
only ever read by Kernex itself, so they are encrypted at rest: a copied data directory alone
cannot mint device certificates, command the fleet or vouch for a bundle. The release key is a
key of its own (not the JWT secret, not the command key): leaking an operator-token secret must
not let anyone sign software the fleet will install.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import secrets
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kernex.broker._files import atomic_write, ensure_private_dir
from kernex.broker.exceptions import PKIError
from kernex.broker.secrets import development_secret
from kernex.broker.settings import BrokerSettings
from kernex.protocol.exceptions import InvalidKeyError
from kernex.protocol.keys import (
    PrivateKey,
    PublicKey,
    check_public_key,
    public_key_fingerprint,
    public_key_to_pem,
)
from kernex.protocol.release import release_key_id

INGEST_IDENTITY = "kernex-ingest"
API_IDENTITY = "kernex-api"
# Certificate CNs that name platform services: the ACL grants them fleet-wide access, so a
# device must never be issued a certificate carrying one of them.
SERVICE_IDENTITIES = (INGEST_IDENTITY, API_IDENTITY)
DEFAULT_BROKER_HOSTS = ("localhost", "127.0.0.1")

CA_VALIDITY = timedelta(days=3650)  # the brief's 10 years: rotating a fleet's trust anchor is an event
# Server and service certificates: 397 days is the CA/Browser Forum ceiling for server
# certificates; `kernex pki init` renews them once they are within RENEW_BEFORE of expiry.
SERVER_CERT_VALIDITY = timedelta(days=397)
SERVICE_CERT_VALIDITY = timedelta(days=397)
RENEW_BEFORE = timedelta(days=30)  # a month of warning for a cron'd or restarted `pki init`
DEVICE_CERT_VALIDITY = timedelta(days=30)  # short-lived: devices renew, and revocation matters less
COMMAND_RING_FILE = "command-keys.json"  # the command key ring (kernex.broker.command_keys)
COMMAND_RING_KEYS_DIR = "command-keys"  # keys rotation added, encrypted like the first
CRL_NAME = "crl.pem"
CRL_LOCK_NAME = ".crl.lock"
CLOCK_SKEW = timedelta(minutes=5)  # backdate notBefore: device clocks lag after a cold boot
COMMAND_KEY_ID_HEX_CHARS = 16  # 64 bits of SPKI SHA-256: unique among the few keys a device pins
PASSPHRASE_BYTES = 32  # generated development passphrase: 256 bits of entropy
CN_MAX_LEN = 64  # RFC 5280 ub-common-name
# Characters that cannot appear in an identity: MQTT wildcards and the level separator would
# break the ACL's %u substitution (Mosquitto then denies the client everything), and control
# characters or whitespace have no business in a CN or a file name.
_FORBIDDEN_IN_IDENTITY = frozenset("/+#\\") | frozenset(chr(c) for c in range(33)) | {"\x7f"}


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate the fleet CA issued: its PEM, serial (lowercase hex) and expiry."""

    pem: str
    serial: str
    not_after: datetime


def check_identity(name: str, what: str = "identity") -> str:
    """Return name if it is usable as a certificate CN, MQTT username and file name."""
    if not name or len(name) > CN_MAX_LEN or name in {".", ".."}:
        raise PKIError(f"invalid {what} {name!r}: 1 to {CN_MAX_LEN} characters required")
    if any(c in _FORBIDDEN_IN_IDENTITY for c in name):
        raise PKIError(f"invalid {what} {name!r}: no whitespace, control characters, '/', '+' or '#'")
    return name


def broker_hosts_for(settings: BrokerSettings, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """Every name the broker is reached by: the broker certificate must carry all of them."""
    hosts = [*DEFAULT_BROKER_HOSTS, settings.mqtt_host, *extra]
    if settings.mqtt_public_host:
        hosts.append(settings.mqtt_public_host)
    return tuple(dict.fromkeys(h for h in hosts if h))


class FleetPKI:
    """The fleet CA and the keys and certificates the platform needs, in one directory."""

    def __init__(self, directory: Path, passphrase: bytes) -> None:
        if not passphrase:
            raise PKIError("the PKI passphrase must not be empty")
        self.directory = directory
        self._passphrase = passphrase
        self._ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
        self._command_key: PrivateKey | None = None
        self._release_key: ec.EllipticCurvePrivateKey | None = None

    @classmethod
    def from_settings(cls, settings: BrokerSettings) -> FleetPKI:
        """The PKI in the settings' data dir, unlocked with KERNEX_PKI_PASSPHRASE.

        In development a missing passphrase is generated once into the data dir and reused;
        production settings refuse to load without one.
        """
        if settings.pki_passphrase is not None:
            passphrase = settings.pki_passphrase.get_secret_value().encode("utf-8")
        elif settings.is_production:
            raise PKIError("KERNEX_PKI_PASSPHRASE must be set when KERNEX_ENVIRONMENT=production")
        else:
            passphrase = development_secret(
                settings.data_dir, "pki-passphrase", nbytes=PASSPHRASE_BYTES
            ).encode()
        return cls(settings.pki_dir, passphrase)

    # --- paths -----------------------------------------------------------------------------

    @property
    def ca_cert_path(self) -> Path:
        """The fleet CA certificate: what brokers, services and devices trust."""
        return self.directory / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        """The fleet CA key, encrypted with the passphrase."""
        return self.directory / "ca.key"

    @property
    def broker_cert_path(self) -> Path:
        """Mosquitto's server certificate."""
        return self.directory / "broker.crt"

    @property
    def broker_key_path(self) -> Path:
        """Mosquitto's server key (unencrypted: Mosquitto reads it at start)."""
        return self.directory / "broker.key"

    @property
    def command_key_path(self) -> Path:
        """The control-plane command-signing key, encrypted with the passphrase."""
        return self.directory / "command-signing.key"

    @property
    def release_key_path(self) -> Path:
        """The release key that signs bundle manifests, encrypted with the passphrase."""
        return self.directory / "release-signing.key"

    @property
    def services_dir(self) -> Path:
        """Where service and integrator client certificates live by default."""
        return self.directory / "services"

    def service_cert_path(self, name: str) -> Path:
        """The client certificate of a service such as kernex-ingest."""
        return self.services_dir / f"{check_identity(name, 'service name')}.crt"

    def service_key_path(self, name: str) -> Path:
        """The client key of a service such as kernex-ingest."""
        return self.services_dir / f"{check_identity(name, 'service name')}.key"

    # --- state -----------------------------------------------------------------------------

    @property
    def is_initialized(self) -> bool:
        """True when every file `init()` creates exists."""
        paths = [
            self.ca_cert_path,
            self.ca_key_path,
            self.broker_cert_path,
            self.broker_key_path,
            self.command_key_path,
            self.release_key_path,
        ]
        for name in SERVICE_IDENTITIES:
            paths += [self.service_cert_path(name), self.service_key_path(name)]
        return all(p.is_file() for p in paths)

    @property
    def ca_certificate_pem(self) -> str:
        """The fleet CA certificate in PEM, as registration hands it to devices."""
        return _read(self.ca_cert_path).decode("ascii")

    def init(self, broker_hosts: Sequence[str] = DEFAULT_BROKER_HOSTS) -> bool:
        """Create whatever is missing; True if anything was created or renewed.

        Idempotent: an existing CA is never replaced. The broker and service certificates are
        reissued when missing, not issued by this CA, close to expiry, or (for the broker)
        lacking one of broker_hosts.
        """
        hosts = tuple(dict.fromkeys(broker_hosts))
        if not hosts:
            raise PKIError("the broker certificate needs at least one host name")
        for host in hosts:
            check_identity(host, "broker host")
        ensure_private_dir(self.directory)
        with exclusive_lock(self.directory / ".lock"):
            created = self._ensure_ca()
            ca_cert, _ = self._load_ca()
            if self._needs_certificate(self.broker_cert_path, self.broker_key_path, ca_cert, hosts):
                self._issue_to_files(
                    "Kernex MQTT broker",
                    self.broker_cert_path,
                    self.broker_key_path,
                    SERVER_CERT_VALIDITY,
                    ExtendedKeyUsageOID.SERVER_AUTH,
                    hosts=hosts,
                )
                created = True
            for name in SERVICE_IDENTITIES:
                cert_path, key_path = self.service_cert_path(name), self.service_key_path(name)
                if self._needs_certificate(cert_path, key_path, ca_cert):
                    self._issue_to_files(
                        name, cert_path, key_path, SERVICE_CERT_VALIDITY, ExtendedKeyUsageOID.CLIENT_AUTH
                    )
                    created = True
            for path in (self.command_key_path, self.release_key_path):
                if not path.exists():
                    atomic_write(path, self._encrypt(ec.generate_private_key(ec.SECP256R1())))
                    created = True
        return created

    # --- issuing ---------------------------------------------------------------------------

    def sign_device_csr(
        self,
        csr: x509.CertificateSigningRequest,
        device_id: str,
        validity: timedelta = DEVICE_CERT_VALIDITY,
    ) -> IssuedCertificate:
        """Issue a device's client certificate for the CSR's key.

        The CN is always device_id and nothing else is copied from the CSR: its subject and
        extensions are the requester's wishes, and the CN is what the broker's ACL trusts.
        """
        check_identity(device_id, "device id")
        if device_id in SERVICE_IDENTITIES:
            raise PKIError(f"{device_id!r} is a service identity and cannot name a device")
        try:
            public_key = check_public_key(csr.public_key())
            signature_ok = csr.is_signature_valid
        except InvalidKeyError as exc:
            raise PKIError(f"CSR key not accepted: {exc}") from None
        except (ValueError, UnsupportedAlgorithm, InvalidSignature) as exc:
            raise PKIError(f"CSR cannot be verified: {exc}") from None
        if not signature_ok:
            raise PKIError("CSR signature does not verify: it must be signed by the key it carries")
        cert = self._issue(device_id, public_key, validity, ExtendedKeyUsageOID.CLIENT_AUTH)
        return IssuedCertificate(
            pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            serial=f"{cert.serial_number:x}",
            not_after=cert.not_valid_after_utc,
        )

    @property
    def crl_path(self) -> Path:
        """The fleet CRL (PEM) the broker's listener checks client certificates against."""
        return self.directory / CRL_NAME

    def write_crl(self, revoked: Sequence[tuple[str, datetime]] = ()) -> Path:
        """Add these (hex serial, revocation time) entries to the fleet CRL and sign it anew.

        Revocation is permanent, so entries already in the CRL are kept: two processes revoking
        at once (under the file lock, one after the other) can never drop each other's entries.
        The CRL is valid as long as the CA: OpenSSL refuses every client once a CRL's nextUpdate
        passes, and nothing here re-signs it on a schedule.
        """
        with exclusive_lock(self.directory / CRL_LOCK_NAME):
            ca_cert, ca_key = self._load_ca()
            entries: dict[int, datetime] = {}
            if self.crl_path.exists():
                current = x509.load_pem_x509_crl(_read(self.crl_path))
                entries = {r.serial_number: r.revocation_date_utc for r in current}
            for serial, at in revoked:
                entries.setdefault(int(serial, 16), at)
            now = datetime.now(UTC)
            builder = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(ca_cert.subject)
                .last_update(now - CLOCK_SKEW)
                .next_update(ca_cert.not_valid_after_utc)
            )
            for number, at in sorted(entries.items()):
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(number).revocation_date(at).build()
                )
            crl = builder.sign(ca_key, hashes.SHA256())
            atomic_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path

    def ensure_crl(self) -> Path:
        """The CRL path, writing an empty CRL first if there is none (Mosquitto needs the file)."""
        if not self.crl_path.exists():
            self.write_crl()
        return self.crl_path

    def revoked_serials(self) -> set[str]:
        """The hex serials the fleet CRL lists."""
        if not self.crl_path.exists():
            return set()
        return {f"{r.serial_number:x}" for r in x509.load_pem_x509_crl(_read(self.crl_path))}

    def issue_client_credentials(
        self, common_name: str, validity: timedelta = SERVICE_CERT_VALIDITY
    ) -> tuple[IssuedCertificate, bytes]:
        """A new P-256 key and a client certificate for it, in memory: (certificate, key PEM).

        For credentials handed over once (an integrator created through the API); nothing is
        written, so the key exists only in the answer.
        """
        check_identity(common_name, "common name")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(common_name, key.public_key(), validity, ExtendedKeyUsageOID.CLIENT_AUTH)
        issued = IssuedCertificate(
            pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            serial=f"{cert.serial_number:x}",
            not_after=cert.not_valid_after_utc,
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return issued, key_pem

    def issue_client_certificate(
        self,
        common_name: str,
        directory: Path | None = None,
        validity: timedelta = SERVICE_CERT_VALIDITY,
    ) -> tuple[Path, Path]:
        """Create a new P-256 key and a client certificate for it; returns (cert_path, key_path).

        For services, integrators and tests. Files are `<common_name>.crt|.key` in directory
        (default: the PKI's services directory), replacing any previous pair.
        """
        check_identity(common_name, "common name")
        target = self.services_dir if directory is None else directory
        cert_path, key_path = target / f"{common_name}.crt", target / f"{common_name}.key"
        self._issue_to_files(common_name, cert_path, key_path, validity, ExtendedKeyUsageOID.CLIENT_AUTH)
        return cert_path, key_path

    # --- command signing -------------------------------------------------------------------

    def command_signing_key(self) -> PrivateKey:
        """The control-plane key that signs commands (devices pin its public key)."""
        if self._command_key is None:
            self._command_key = self._load_encrypted(self.command_key_path, "command-signing key")
        return self._command_key

    @property
    def command_public_key(self) -> PublicKey:
        """The public half of the command-signing key."""
        public = self.command_signing_key().public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        return public

    @property
    def command_key_id(self) -> str:
        """The JWS `kid` of commands: "cp-" and 64 bits of the key's SPKI SHA-256."""
        return "cp-" + public_key_fingerprint(self.command_public_key)[:COMMAND_KEY_ID_HEX_CHARS]

    @property
    def command_public_key_pem(self) -> str:
        """The command-signing public key, as registration hands it to devices to pin."""
        return public_key_to_pem(self.command_public_key)

    def seal_key(self, key: ec.EllipticCurvePrivateKey) -> bytes:
        """A key as PEM encrypted with the PKI passphrase (how every signing key is kept at rest)."""
        return self._encrypt(key)

    def open_key(self, path: Path, what: str) -> ec.EllipticCurvePrivateKey:
        """Decrypt a key kept by seal_key; PKIError when missing, unencrypted or undecryptable."""
        return self._load_encrypted(path, what)

    # --- release signing -------------------------------------------------------------------

    def release_signing_key(self) -> ec.EllipticCurvePrivateKey:
        """The ECDSA P-256 key that signs bundle releases (devices pin its public key)."""
        if self._release_key is None:
            self._release_key = self._load_encrypted(self.release_key_path, "release key")
        return self._release_key

    @property
    def release_key_id(self) -> str:
        """The JWS `kid` of release signatures: "rel-" and 64 bits of the key's SPKI SHA-256."""
        return release_key_id(self.release_signing_key().public_key())

    # --- custody -----------------------------------------------------------------------------

    @property
    def custody_paths(self) -> tuple[Path, ...]:
        """The files a backup must keep: the CA certificate, the passphrase-encrypted keys, and
        the command key ring once rotated.

        The broker and service certificates are left out on purpose: their keys are unencrypted
        (Mosquitto and paho read them as they are), and `init()` reissues them from the CA.
        """
        fixed = (self.ca_cert_path, self.ca_key_path, self.command_key_path, self.release_key_path)
        return fixed + self._command_ring_paths()

    def _command_ring_paths(self) -> tuple[Path, ...]:
        """The ring file and the keys rotation added, once there has been a rotation.

        Without them a restored platform would sign with the first key at ring version 0, and
        devices that took up a newer key set would refuse every later one as a rollback.
        """
        ring = self.directory / COMMAND_RING_FILE
        keys = sorted((self.directory / COMMAND_RING_KEYS_DIR).glob("*.key"))
        return ((ring,) if ring.is_file() else ()) + tuple(keys)

    def check_keys(self) -> None:
        """Decrypt the CA, command-signing (every one of the ring) and release keys; PKIError says
        which one fails and why.

        An unencrypted key is refused like everywhere else: a backup or restore must never
        spread one.
        """
        self._load_ca()
        self.command_signing_key()
        self.release_signing_key()
        for path in sorted((self.directory / COMMAND_RING_KEYS_DIR).glob("*.key")):
            self._load_encrypted(path, f"command-signing key {path.stem}")

    # --- TLS ---------------------------------------------------------------------------------

    def client_ssl_context(self, identity: str = INGEST_IDENTITY) -> ssl.SSLContext:
        """A TLS client context trusting only the fleet CA and presenting a service's certificate."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_cert_path))
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # the broker's floor, see mosquitto.conf
        context.load_cert_chain(self.service_cert_path(identity), self.service_key_path(identity))
        return context

    # --- internals -------------------------------------------------------------------------

    def _ensure_ca(self) -> bool:
        if self.ca_cert_path.exists():
            if not self.ca_key_path.exists():
                raise PKIError(f"{self.ca_cert_path} exists but its key {self.ca_key_path} is missing")
            return False
        if self.ca_key_path.exists():
            raise PKIError(
                f"{self.ca_key_path} exists without {self.ca_cert_path}: restore the certificate, "
                "or remove the key to start a new fleet CA"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        # A random suffix tells two installations' CAs apart in logs and trust stores.
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Kernex"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Kernex Fleet CA {secrets.token_hex(4)}"),
            ]
        )
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_VALIDITY)
            # pathlen 0: the fleet CA signs leaf certificates only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        # Key first: a crash in between leaves a key without a certificate, which init reports,
        # rather than a trusted certificate whose key is lost.
        atomic_write(self.ca_key_path, self._encrypt(key))
        atomic_write(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._ca = (cert, key)
        return True

    def _load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if self._ca is None:
            if not self.ca_cert_path.exists():
                raise PKIError(f"the fleet PKI in {self.directory} is not initialized: run `kernex pki init`")
            cert = _load_certificate(self.ca_cert_path)
            key = self._load_encrypted(self.ca_key_path, "fleet CA key")
            if public_key_fingerprint(key.public_key()) != _fingerprint_of(cert):
                raise PKIError(f"{self.ca_key_path} does not belong to {self.ca_cert_path}")
            self._ca = (cert, key)
        return self._ca

    def _load_encrypted(self, path: Path, what: str) -> ec.EllipticCurvePrivateKey:
        data = _read(path)
        try:
            key = serialization.load_pem_private_key(data, password=self._passphrase)
        except TypeError:
            raise PKIError(f"the {what} in {path} is not encrypted; refusing to use it") from None
        except (ValueError, UnsupportedAlgorithm):
            raise PKIError(
                f"cannot decrypt the {what} in {path}: wrong PKI passphrase (KERNEX_PKI_PASSPHRASE)?"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"the {what} in {path} is not an ECDSA P-256 key")
        return key

    def _encrypt(self, key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self._passphrase),
        )

    def _needs_certificate(
        self, cert_path: Path, key_path: Path, ca_cert: x509.Certificate, hosts: Sequence[str] = ()
    ) -> bool:
        if not cert_path.exists() or not key_path.exists():
            return True
        cert = _load_certificate(cert_path)
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            return True  # issued by an earlier CA: reissue under the current one
        if cert.not_valid_after_utc - datetime.now(UTC) < RENEW_BEFORE:
            return True
        if hosts:
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            except x509.ExtensionNotFound:
                return True
            present = {str(v) for v in san.get_values_for_type(x509.DNSName)}
            present |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
            return not set(hosts) <= present
        return False

    def _issue_to_files(
        self,
        common_name: str,
        cert_path: Path,
        key_path: Path,
        validity: timedelta,
        usage: x509.ObjectIdentifier,
        *,
        hosts: Sequence[str] = (),
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(common_name, key.public_key(), validity, usage, hosts=hosts)
        ensure_private_dir(cert_path.parent)
        # Unencrypted PKCS#8: Mosquitto and paho load these files without a passphrase.
        atomic_write(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))

    def _issue(
        self,
        common_name: str,
        public_key: PublicKey,
        validity: timedelta,
        usage: x509.ObjectIdentifier,
        *,
        hosts: Sequence[str] = (),
    ) -> x509.Certificate:
        if validity <= timedelta(0):
            raise PKIError("certificate validity must be positive")
        ca_cert, ca_key = self._load_ca()
        now = datetime.now(UTC)
        # A certificate never outlives the CA that vouches for it.
        not_after = min(now + validity, ca_cert.not_valid_after_utc)
        # Backdated for lagging clocks, but never by more than its validity: a device renews
        # once a fraction of notBefore..notAfter remains, which the backdate must not swallow.
        not_before = now - min(CLOCK_SKEW, validity)
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    # RSA TLS servers may still be asked for RSA key transport; EC and EdDSA never.
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
            )
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False
            )
        return builder.sign(ca_key, hashes.SHA256())


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _fingerprint_of(cert: x509.Certificate) -> str:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise PKIError("the fleet CA certificate does not carry an ECDSA key")
    return public_key_fingerprint(public)


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise PKIError(f"{path} is not a PEM certificate: {exc}") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{path} is missing: run `kernex pki init`") from None
    except OSError as exc:
        raise PKIError(f"cannot read {path}: {exc.strerror}") from None


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Serialise changes to the PKI directory between processes (`kernex up` may start several)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
