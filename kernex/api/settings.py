"""Settings of the API process."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from kernex.broker.settings import BrokerSettings
from kernex.storage.settings import StorageSettings

API_PORT = 8000  # the conventional local development port for HTTP APIs
DEVICE_CERT_VALIDITY_DAYS = 30  # short-lived: a lost device's certificate dies within a month


class AdmissionPolicy(StrEnum):
    """How a registering device is admitted (DESIGN.md "Admission policy")."""

    AUTO = "auto"


class ApiSettings(StorageSettings, BrokerSettings):
    """Everything the API process reads from `KERNEX_*` environment variables."""

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=API_PORT, ge=1, le=65535)
    admission_policy: AdmissionPolicy = AdmissionPolicy.AUTO
    device_cert_validity_days: int = Field(default=DEVICE_CERT_VALIDITY_DAYS, ge=1, le=397)
    # Bodies above this are refused with 413 before they are read (bundle uploads have their own).
    max_body_bytes: int = 1024 * 1024

    @property
    def advertised_mqtt_host(self) -> str:
        """The broker host devices are told to use."""
        return self.mqtt_public_host or self.mqtt_host

    @property
    def advertised_mqtt_port(self) -> int:
        """The broker port devices are told to use."""
        return self.mqtt_public_port or self.mqtt_port
