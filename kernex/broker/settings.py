"""Broker and PKI settings shared by the processes that talk to Mosquitto or sign certificates."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from kernex.kit.settings import KernexSettings
from kernex.protocol.topics import DEFAULT_PREFIX

MQTT_TLS_PORT = 8883  # IANA port for MQTT over TLS
# 256 KiB: a heartbeat JWS is about 1-2 KiB, so this leaves ample margin while refusing
# megabyte payloads (mosquitto.conf explains the figure next to max_packet_size).
MAX_PACKET_SIZE = 262_144


class BrokerSettings(KernexSettings):
    """How services reach the broker, what devices are told, and where the fleet PKI lives."""

    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = MQTT_TLS_PORT
    # What registration tells devices; defaults to mqtt_host/mqtt_port.
    mqtt_public_host: str | None = None
    mqtt_public_port: int | None = None
    topic_prefix: str = DEFAULT_PREFIX
    # Encrypts the fleet CA key at rest. Generated into the data dir in development only.
    pki_passphrase: SecretStr | None = None
    # The broker's max_packet_size; ingest rejects larger payloads (reason too_large) as well.
    mqtt_max_packet_size: int = Field(default=MAX_PACKET_SIZE, ge=1024)
    # Where `kernex broker run` listens: loopback by default; 0.0.0.0 to serve a real fleet.
    broker_bind_address: str = "127.0.0.1"

    @property
    def pki_dir(self) -> Path:
        """The fleet PKI directory inside the data dir."""
        return self.data_dir / "pki"

    @model_validator(mode="after")
    def _require_secrets_in_production(self) -> BrokerSettings:
        if self.is_production:
            secret = self.pki_passphrase.get_secret_value() if self.pki_passphrase else ""
            if len(secret) < 16:  # noqa: PLR2004 - below 16 characters a passphrase is guessable
                raise ValueError(
                    "KERNEX_PKI_PASSPHRASE must be set (16+ characters) when KERNEX_ENVIRONMENT=production"
                )
        return self
