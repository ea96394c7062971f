"""Render the production mosquitto.conf template and the ACL for one broker instance."""

from __future__ import annotations

import importlib.resources
import os
import pwd
import string
from dataclasses import dataclass
from pathlib import Path

from kernex.broker._files import atomic_write, ensure_private_dir
from kernex.broker.acl import render_acl
from kernex.broker.exceptions import BrokerConfigError
from kernex.broker.integrators import IntegratorRegistry
from kernex.broker.pki import FleetPKI
from kernex.broker.settings import BrokerSettings
from kernex.protocol.exceptions import TopicError
from kernex.protocol.topics import Topics

# The wheel carries the repo-root mosquitto.conf under this name (pyproject force-include).
TEMPLATE_RESOURCE = "mosquitto.conf.template"
# In an editable checkout the template is the repo-root file, two levels above this package.
CHECKOUT_TEMPLATE = Path(__file__).resolve().parents[2] / "mosquitto.conf"
CONF_NAME = "mosquitto.conf"  # also kernex.broker.integrators.CONF_NAME
ACL_NAME = "acl"
PERSISTENCE_DIR_NAME = "data"
MAX_PORT = 65_535


@dataclass(frozen=True)
class RenderedBroker:
    """A rendered broker instance: its config, its ACL and where it listens."""

    conf_path: Path
    acl_path: Path
    port: int
    bind_address: str
    persistence_dir: Path


def load_template() -> str:
    """The production mosquitto.conf template, from the installed package or the checkout."""
    resource = importlib.resources.files("kernex.broker").joinpath(TEMPLATE_RESOURCE)
    if resource.is_file():
        return resource.read_text(encoding="utf-8")
    if CHECKOUT_TEMPLATE.is_file():
        return CHECKOUT_TEMPLATE.read_text(encoding="utf-8")
    raise BrokerConfigError(
        f"mosquitto.conf template not found: neither kernex/broker/{TEMPLATE_RESOURCE} "
        f"nor {CHECKOUT_TEMPLATE} exists"
    )


def render(
    settings: BrokerSettings,
    pki: FleetPKI,
    out_dir: Path,
    *,
    port: int | None = None,
    bind_address: str = "127.0.0.1",
) -> RenderedBroker:
    """Write mosquitto.conf and the ACL into out_dir (0700), with the persistence dir inside it."""
    if not pki.is_initialized:
        raise BrokerConfigError(f"the fleet PKI in {pki.directory} is not initialized: run `kernex pki init`")
    listen_port = settings.mqtt_port if port is None else port
    if not 0 < listen_port <= MAX_PORT:
        raise BrokerConfigError(f"invalid port {listen_port}")
    try:
        topics = Topics(settings.topic_prefix)
    except TopicError as exc:
        raise BrokerConfigError(str(exc)) from None
    out_dir = out_dir.resolve()
    persistence_dir = out_dir / PERSISTENCE_DIR_NAME
    ensure_private_dir(out_dir)
    ensure_private_dir(persistence_dir)
    acl_path = out_dir / ACL_NAME
    conf_path = out_dir / CONF_NAME
    values = {
        "port": str(listen_port),
        "bind_address": bind_address,
        "cafile": str(pki.ca_cert_path.resolve()),
        "certfile": str(pki.broker_cert_path.resolve()),
        "keyfile": str(pki.broker_key_path.resolve()),
        # Revoked device certificates; re-read on SIGHUP (reload_broker) for new connections.
        "crlfile": str(pki.ensure_crl().resolve()),
        "acl_file": str(acl_path),
        # No trailing slash: Mosquitto 2.0 joins persistence_location and the file name with one.
        "persistence_dir": str(persistence_dir),
        # The effective user, not $USER: that is who owns the keys and who Mosquitto starts as.
        "user": pwd.getpwuid(os.geteuid()).pw_name,
        "max_packet_size": str(settings.mqtt_max_packet_size),
    }
    for name, value in values.items():
        # Each value must stay on its own config line, and a value with a space would be read
        # as two arguments by `listener`.
        if not value or any(not c.isprintable() for c in value) or (name == "bind_address" and " " in value):
            raise BrokerConfigError(f"{name} {value!r} cannot be written into mosquitto.conf")
    try:
        conf = string.Template(load_template()).substitute(values)
    except (KeyError, ValueError) as exc:
        raise BrokerConfigError(
            f"mosquitto.conf template has an unknown or malformed placeholder: {exc}"
        ) from None
    # The ACL first: a config pointing at a missing ACL would make Mosquitto refuse to start.
    integrators = IntegratorRegistry(pki).active_identities()
    atomic_write(acl_path, render_acl(topics, integrators=integrators).encode("utf-8"))
    atomic_write(conf_path, conf.encode("utf-8"))
    return RenderedBroker(
        conf_path=conf_path,
        acl_path=acl_path,
        port=listen_port,
        bind_address=bind_address,
        persistence_dir=persistence_dir,
    )
