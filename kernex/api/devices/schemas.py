"""Request and response bodies of the devices domain."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kernex.storage.models import AdmissionState, ConnectionState


class DeviceSort(StrEnum):
    """The order of a device list page."""

    REGISTERED = "registered"  # newest registrations first
    NAME = "name"  # by name (the id when unnamed)
    STATUS = "status"  # offline, online, unknown, then by name
    LAST_SEEN = "last_seen"  # most recently seen first; never seen last
    VERSION = "version"  # by installed bundle version (text order); none last


class DeviceMetrics(BaseModel):
    """Latest resource figures (from the heartbeat with the highest seq)."""

    cpu_percent: float | None
    memory_mb: float | None
    disk_free_mb: float | None
    uptime_s: float | None


class BundleInfo(BaseModel):
    """The bundle a device last reported running."""

    id: str | None
    version: str | None


class DeviceOut(BaseModel):
    """A device as operators see it."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str | None
    state: AdmissionState
    status: ConnectionState
    status_changed_at: datetime | None
    key_type: str
    hardware: dict[str, Any] | None
    tags: list[str]
    registered_at: datetime
    last_seen_at: datetime | None
    last_seq: int | None
    last_heartbeat_at: datetime | None
    health: str | None
    metrics: DeviceMetrics
    bundle: BundleInfo
    config_version: int | None
    agent_version: str | None
    cert_not_after: datetime | None


class CertificateRenewal(BaseModel):
    """A device's CSR for a new certificate: its own key (renewal) or a new key (rotation)."""

    model_config = ConfigDict(extra="forbid")

    csr: str = Field(min_length=1, max_length=16_384)


class RenewedCertificate(BaseModel):
    """The new client certificate (CN = device id) and the CA that issued it."""

    device_id: str
    certificate: str
    ca_certificate: str
    not_after: datetime
    rotated: bool


class RevocationOut(BaseModel):
    """A revoked device, and what happened at the broker."""

    device: DeviceOut
    crl_serial: str | None
    broker_reloaded: bool
    session_cut: bool
    cleared_commands: int
    # Broker steps that failed (the device is refused by the API and ingest regardless).
    errors: list[str]


class DeviceDetail(DeviceOut):
    """A device with its public key."""

    public_key_pem: str
    key_fingerprint: str


class DevicePage(BaseModel):
    """One page of devices."""

    items: list[DeviceOut]
    total: int
    limit: int
    offset: int


class HeartbeatOut(BaseModel):
    """One stored heartbeat."""

    model_config = ConfigDict(from_attributes=True)

    seq: int
    ts: datetime
    received_at: datetime
    status: str
    cpu_percent: float
    memory_mb: float
    disk_free_mb: float
    uptime_s: float
    bundle_id: str | None
    bundle_version: str | None
    config_version: int | None
    agent_version: str


class HeartbeatPage(BaseModel):
    """Heartbeats newest first."""

    device_id: str
    items: list[HeartbeatOut]


class FleetStats(BaseModel):
    """Counts for the fleet overview."""

    total: int
    online: int
    offline: int
    unknown: int
    by_state: dict[str, int]
    by_bundle_version: dict[str, int]
    active_deployments: int
