"""Integrators: read-only MQTT clients of the verified fleet topics (`<prefix>/fleet/#`).

An integrator gets a client certificate from the fleet CA whose CN is `integrator-<name>`.
Device ids are hex key fingerprints and service identities start with `kernex-`, so the CN
never names a device or a service, and the ACL grants it `topic read <prefix>/fleet/#` and
nothing else: publishing anywhere, and reading device topics, are refused by the broker.

The list lives in `integrators.json` in the PKI directory, beside the CA that issued the
certificates; rendering the broker config writes the active ones into the ACL. Revoking removes
an integrator from the ACL and reloads Mosquitto (SIGHUP), which re-reads the ACL without
dropping connections: from then on the broker delivers it nothing and refuses its subscriptions'
messages. Its certificate still completes the TLS handshake until it expires (the fleet has no
CRL yet), but the connection is good for nothing.
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

from cryptography import x509

from kernex.broker._files import atomic_write
from kernex.broker.acl import render_acl
from kernex.broker.exceptions import BrokerConfigError, BrokerError
from kernex.broker.pki import FleetPKI
from kernex.protocol.topics import Topics

INTEGRATOR_PREFIX = "integrator-"
REGISTRY_NAME = "integrators.json"
PID_NAME = "mosquitto.pid"  # written by MosquittoProcess beside the config it runs
CONF_NAME = "mosquitto.conf"  # kernex.broker.config.CONF_NAME (which imports this module)
# Lowercase letters, digits and dashes: safe as a CN, an MQTT username and a file name.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


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

    def create(self, name: str, directory: Path) -> tuple[Integrator, Path, Path]:
        """Issue a certificate into directory; returns the integrator, cert path and key path.

        Creating a name again (revoked or not) issues a new certificate and reactivates it.
        """
        identity = identity_for(name)
        cert_path, key_path = self._pki.issue_client_certificate(identity, directory)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        integrator = Integrator(
            name=name,
            identity=identity,
            serial=f"{cert.serial_number:x}",
            created_at=datetime.now(UTC).isoformat(),
        )
        self._save([*(i for i in self.all() if i.name != name), integrator])
        return integrator, cert_path, key_path

    def revoke(self, name: str) -> Integrator:
        """Mark an integrator revoked; BrokerConfigError if there is no such integrator."""
        found = {i.name: i for i in self.all()}
        current = found.get(name)
        if current is None:
            raise BrokerConfigError(f"no integrator named {name!r}")
        if not current.active:
            return current
        revoked = Integrator(**{**asdict(current), "revoked_at": datetime.now(UTC).isoformat()})
        found[name] = revoked
        self._save(list(found.values()))
        return revoked

    def _save(self, integrators: list[Integrator]) -> None:
        data: dict[str, Any] = {"integrators": [asdict(i) for i in sorted(integrators, key=lambda i: i.name)]}
        atomic_write(self.path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


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
