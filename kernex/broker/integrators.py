"""Integrators: read-only MQTT clients of the verified fleet topics (`<prefix>/fleet/#`).

An integrator gets a client certificate from the fleet CA whose CN is `integrator-<name>`.
Device ids are hex key fingerprints and service identities start with `kernex-`, so the CN
never names a device or a service, and the ACL grants it `topic read <prefix>/fleet/#` and
nothing else: publishing anywhere, and reading device topics, are refused by the broker.

The list lives in `integrators.json` in the PKI directory, beside the CA that issued the
certificates; rendering the broker config writes the active ones into the ACL. Revoking removes
an integrator from the ACL and reloads Mosquitto (SIGHUP), which re-reads the ACL without
dropping connections: from then on the broker delivers it nothing. Its certificate goes into
the fleet CRL, which the same reload makes Mosquitto re-read, so it cannot even complete a TLS
handshake any more; issuing a name again revokes the certificate it had before.

The CLI (`kernex integrations`) and the API (`/api/v1/integrations`) share this module: the
registry changes under a file lock, and `apply` brings a rendered broker up to date.
"""

from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kernex.broker._files import atomic_write, ensure_private_dir
from kernex.broker.acl import render_acl
from kernex.broker.exceptions import BrokerConfigError, BrokerError
from kernex.broker.pki import FleetPKI, exclusive_lock
from kernex.protocol.topics import Topics

INTEGRATOR_PREFIX = "integrator-"
REGISTRY_NAME = "integrators.json"
PID_NAME = "mosquitto.pid"  # written by MosquittoProcess beside the config it runs
CONF_NAME = "mosquitto.conf"  # kernex.broker.config.CONF_NAME (which imports this module)
ACL_NAME = "acl"  # kernex.broker.config.ACL_NAME, for the same reason
# Lowercase letters, digits and dashes: safe as a CN, an MQTT username and a file name.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


class IntegratorNotFoundError(BrokerConfigError):
    """No integrator has that name."""


@dataclass(frozen=True)
class Integrator:
    """One integrator as the registry records it."""

    name: str
    identity: str  # certificate CN = MQTT username
    serial: str  # lowercase hex, of the certificate last issued
    created_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        """Whether the ACL lets it read the fleet topics."""
        return self.revoked_at is None


@dataclass(frozen=True)
class IssuedIntegrator:
    """A new integrator credential: the key exists only here (and wherever the caller puts it)."""

    integrator: Integrator
    certificate_pem: str
    private_key_pem: bytes


def identity_for(name: str) -> str:
    """The certificate CN of an integrator name; BrokerConfigError for an unusable name."""
    if not NAME_PATTERN.fullmatch(name):
        raise BrokerConfigError(
            f"invalid integrator name {name!r}: 1 to 40 lowercase letters, digits or dashes, "
            "starting with a letter or digit"
        )
    return f"{INTEGRATOR_PREFIX}{name}"


class IntegratorRegistry:
    """The integrators of one fleet PKI (`<pki dir>/integrators.json`)."""

    def __init__(self, pki: FleetPKI, path: Path | None = None) -> None:
        self._pki = pki
        self.path = pki.directory / REGISTRY_NAME if path is None else path

    def all(self) -> list[Integrator]:
        """Every integrator, revoked ones included, by name."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise BrokerConfigError(f"cannot read {self.path}: {exc}") from None
        try:
            return sorted((Integrator(**item) for item in raw["integrators"]), key=lambda i: i.name)
        except (KeyError, TypeError) as exc:
            raise BrokerConfigError(f"{self.path} is not an integrator registry: {exc}") from None

    def active_identities(self) -> list[str]:
        """The CNs the ACL grants fleet read access to."""
        return [i.identity for i in self.all() if i.active]

    def get(self, name: str) -> Integrator:
        """One integrator; IntegratorNotFoundError if there is none of that name."""
        found = next((i for i in self.all() if i.name == name), None)
        if found is None:
            raise IntegratorNotFoundError(f"no integrator named {name!r}")
        return found

    def issue(self, name: str) -> IssuedIntegrator:
        """Issue a certificate and key in memory (nothing written but the registry and the CRL).

        Issuing a name again (revoked or not) reactivates it with a new certificate; the one it
        had before goes into the CRL, so only the newest credential works.
        """
        identity = identity_for(name)
        with exclusive_lock(self._lock_path):
            issued, key_pem = self._pki.issue_client_credentials(identity)
            now = datetime.now(UTC)
            integrator = Integrator(
                name=name, identity=identity, serial=issued.serial, created_at=now.isoformat()
            )
            previous = {i.name: i for i in self.all()}.get(name)
            if previous is not None and previous.serial not in self._pki.revoked_serials():
                self._pki.write_crl([(previous.serial, now)])
            self._save([*(i for i in self.all() if i.name != name), integrator])
        return IssuedIntegrator(integrator, issued.pem, key_pem)

    def create(self, name: str, directory: Path) -> tuple[Integrator, Path, Path]:
        """Issue a certificate into directory; returns the integrator, cert path and key path."""
        issued = self.issue(name)
        cert_path = directory / f"{issued.integrator.identity}.crt"
        key_path = directory / f"{issued.integrator.identity}.key"
        ensure_private_dir(directory)
        atomic_write(key_path, issued.private_key_pem)
        atomic_write(cert_path, issued.certificate_pem.encode("ascii"))
        return issued.integrator, cert_path, key_path

    def revoke(self, name: str) -> Integrator:
        """Take an integrator out of the ACL and put its certificate in the CRL.

        IntegratorNotFoundError if there is no such integrator; revoking twice is harmless.
        """
        with exclusive_lock(self._lock_path):
            found = {i.name: i for i in self.all()}
            current = found.get(name)
            if current is None:
                raise IntegratorNotFoundError(f"no integrator named {name!r}")
            if not current.active:
                return current
            now = datetime.now(UTC)
            # CRL first: a crash in between leaves a revoked certificate listed as active,
            # which the next revoke finishes, never an inactive one that still handshakes.
            self._pki.write_crl([(current.serial, now)])
            revoked = Integrator(**{**asdict(current), "revoked_at": now.isoformat()})
            found[name] = revoked
            self._save(list(found.values()))
        return revoked

    @property
    def _lock_path(self) -> Path:
        ensure_private_dir(self.path.parent)  # the registry may be the first file there
        return self.path.with_name(f".{self.path.name}.lock")

    def _save(self, integrators: list[Integrator]) -> None:
        data: dict[str, Any] = {"integrators": [asdict(i) for i in sorted(integrators, key=lambda i: i.name)]}
        atomic_write(self.path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


@dataclass(frozen=True)
class Applied:
    """What `apply` did to a rendered broker."""

    acl_path: Path | None  # None: no rendered broker there (the ACL is written at its rendering)
    reloaded_pid: int | None  # None: no Mosquitto of that directory runs (it reads both at start)


def apply(broker_dir: Path, topics: Topics, registry: IntegratorRegistry) -> Applied:
    """Rewrite the rendered ACL (if the broker was rendered there) and reload a running broker.

    The reload makes Mosquitto re-read the ACL and the CRL: a revoked integrator is cut off at
    both layers.
    """
    acl_path = broker_dir / ACL_NAME
    if not acl_path.exists():
        return Applied(acl_path=None, reloaded_pid=None)
    write_acl(acl_path, topics, registry)
    return Applied(acl_path=acl_path, reloaded_pid=reload_broker(broker_dir))


def write_acl(acl_path: Path, topics: Topics, registry: IntegratorRegistry) -> None:
    """Rewrite a rendered broker's ACL with the registry's active integrators."""
    atomic_write(acl_path, render_acl(topics, integrators=registry.active_identities()).encode("utf-8"))


def reload_broker(broker_dir: Path) -> int | None:
    """SIGHUP the Mosquitto running the config in broker_dir; its pid, or None if none runs.

    The pid comes from the pid file MosquittoProcess writes, and is only signalled if that
    process still runs mosquitto with this directory's config (a recycled pid is left alone).
    """
    pid_path = broker_dir / PID_NAME
    try:
        pid = int(pid_path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BrokerError(f"cannot read {pid_path}: {exc}") from None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return None
    conf = str((broker_dir / CONF_NAME).resolve()).encode()
    if not cmdline or not cmdline[0].endswith(b"mosquitto") or conf not in cmdline:
        return None
    os.kill(pid, signal.SIGHUP)
    return pid
