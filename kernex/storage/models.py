"""The database schema as SQLModel tables.

Every schema change ships as an Alembic migration in `migrations/versions/` that runs on both
PostgreSQL and SQLite; tests compare the migrated schema with these models.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from kernex.storage.types import JSONType, UTCDateTime, str_enum


def _now() -> datetime:
    return datetime.now(UTC)


def _uuid() -> str:
    return uuid.uuid4().hex


class AdmissionState(StrEnum):
    """Where a device stands with the fleet (DESIGN.md "Admission policy")."""

    ACTIVE = "active"
    PENDING = "pending"
    REJECTED = "rejected"
    REVOKED = "revoked"


class ConnectionState(StrEnum):
    """Whether a device is connected, as its retained status topic and heartbeats say."""

    UNKNOWN = "unknown"
    ONLINE = "online"
    OFFLINE = "offline"


class Device(SQLModel, table=True):
    """A registered device and its latest reported state (decided by seq, never arrival)."""

    __tablename__ = "devices"
    # The device list's order (newest registrations first, id as tie-break): a page is an index
    # range read, not a sort of the whole fleet (tests/test_storage_partitions.py checks).
    __table_args__ = (sa.Index("ix_devices_registered_at_id", "registered_at", "id"),)

    id: str = Field(primary_key=True, max_length=64)
    name: str | None = Field(default=None, max_length=128, index=True)
    hardware: dict[str, Any] | None = Field(default=None, sa_type=JSONType)
    key_type: str = Field(max_length=16)
    public_key_pem: str = Field(sa_type=sa.Text)
    key_fingerprint: str = Field(max_length=64, unique=True)
    state: AdmissionState = Field(default=AdmissionState.ACTIVE, sa_type=str_enum(AdmissionState), index=True)
    status: ConnectionState = Field(
        default=ConnectionState.UNKNOWN, sa_type=str_enum(ConnectionState), index=True
    )
    status_changed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    cert_serial: str | None = Field(default=None, max_length=64)
    cert_not_after: datetime | None = Field(default=None, sa_type=UTCDateTime)
    tags: list[str] = Field(default_factory=list, sa_type=JSONType)
    registered_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    last_seen_at: datetime | None = Field(default=None, sa_type=UTCDateTime, index=True)
    # Latest heartbeat, by seq.
    last_seq: int | None = Field(default=None, sa_type=sa.BigInteger)
    last_heartbeat_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    health: str | None = Field(default=None, max_length=64)
    cpu_percent: float | None = None
    memory_mb: float | None = None
    disk_free_mb: float | None = None
    uptime_s: float | None = None
    bundle_id: str | None = Field(default=None, max_length=128)
    bundle_version: str | None = Field(default=None, max_length=64, index=True)
    config_version: int | None = Field(default=None, sa_type=sa.BigInteger)
    agent_version: str | None = Field(default=None, max_length=64)
    # The revision of the last command issued to the device: only grows, bumped in the
    # transaction that records the command (kernex.protocol.commands: agents ignore lower ones).
    command_revision: int = Field(default=0, sa_type=sa.BigInteger, sa_column_kwargs={"server_default": "0"})
    # The desired heartbeat interval (from its configuration); None: the default. The liveness
    # sweeper marks the device offline after a few intervals of silence.
    heartbeat_interval_s: int | None = None
    # The configuration version the device last reported applying (config_applied event) and the
    # seq of that event: it counts only if newer than the heartbeat that set config_version.
    config_applied_version: int | None = Field(default=None, sa_type=sa.BigInteger)
    config_applied_seq: int | None = Field(default=None, sa_type=sa.BigInteger)
    config_applied_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    config_error: str | None = Field(default=None, sa_type=sa.Text)
    # When the device was revoked (its certificate is in the fleet CRL from then on).
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # When ingest told integrators (fleet status "revoked"); None while that is still to do.
    revocation_announced_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class DeviceCertificate(SQLModel, table=True):
    """A certificate the fleet CA issued to a device: revoking the device revokes every one of
    them still valid (a renewal leaves the previous certificate valid until it expires)."""

    __tablename__ = "device_certificates"

    serial: str = Field(primary_key=True, max_length=64)  # lowercase hex, as in the CRL
    device_id: str = Field(max_length=64, foreign_key="devices.id", ondelete="CASCADE", index=True)
    issued_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    not_after: datetime = Field(sa_type=UTCDateTime)


class Heartbeat(SQLModel, table=True):
    """One verified heartbeat; (device_id, seq) is stored once, so redelivery is idempotent."""

    __tablename__ = "heartbeats"
    __table_args__ = (sa.Index("ix_heartbeats_device_ts", "device_id", "ts"),)

    device_id: str = Field(primary_key=True, max_length=64, foreign_key="devices.id", ondelete="CASCADE")
    seq: int = Field(primary_key=True, sa_type=sa.BigInteger)
    ts: datetime = Field(sa_type=UTCDateTime)
    received_at: datetime = Field(sa_type=UTCDateTime)
    status: str = Field(max_length=64)
    cpu_percent: float
    memory_mb: float
    disk_free_mb: float
    uptime_s: float
    bundle_id: str | None = Field(default=None, max_length=128)
    bundle_version: str | None = Field(default=None, max_length=64)
    config_version: int | None = Field(default=None, sa_type=sa.BigInteger)
    agent_version: str = Field(default="", max_length=64)


class DeviceEvent(SQLModel, table=True):
    """One verified device event (deployment progress, config applied, ...)."""

    __tablename__ = "device_events"
    __table_args__ = (sa.Index("ix_device_events_device_ts", "device_id", "ts"),)

    device_id: str = Field(primary_key=True, max_length=64, foreign_key="devices.id", ondelete="CASCADE")
    seq: int = Field(primary_key=True, sa_type=sa.BigInteger)
    ts: datetime = Field(sa_type=UTCDateTime)
    received_at: datetime = Field(sa_type=UTCDateTime)
    type: str = Field(max_length=64, index=True)
    data: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)


class DeviceStatusChange(SQLModel, table=True):
    """A recorded online/offline/revoked transition."""

    __tablename__ = "device_status_changes"
    __table_args__ = (sa.Index("ix_device_status_changes_device_at", "device_id", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=64, foreign_key="devices.id", ondelete="CASCADE")
    status: str = Field(max_length=16)
    at: datetime = Field(sa_type=UTCDateTime)
    reason: str | None = Field(default=None, max_length=128)


class Bundle(SQLModel, table=True):
    """An uploaded update bundle and its signed manifest."""

    __tablename__ = "bundles"
    __table_args__ = (sa.UniqueConstraint("name", "version", name="uq_bundles_name_version"),)

    id: str = Field(default_factory=_uuid, primary_key=True, max_length=64)
    name: str = Field(max_length=128)
    version: str = Field(max_length=64)
    sha256: str = Field(max_length=64)
    size: int = Field(sa_type=sa.BigInteger)
    manifest: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    signature: str | None = Field(default=None, sa_type=sa.Text)
    storage_key: str = Field(max_length=512)
    quarantined: bool = False
    created_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    created_by: str | None = Field(default=None, max_length=128)


class Deployment(SQLModel, table=True):
    """A bundle rolled out to a set of devices."""

    __tablename__ = "deployments"

    id: str = Field(default_factory=_uuid, primary_key=True, max_length=64)
    bundle_id: str = Field(max_length=64, foreign_key="bundles.id", index=True)
    status: str = Field(default="pending", max_length=32, index=True)
    rollback: bool = False
    timeout_s: int = 300
    created_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    created_by: str | None = Field(default=None, max_length=128)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    cancelled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    cancelled_by: str | None = Field(default=None, max_length=128)


class DeploymentTarget(SQLModel, table=True):
    """One device's part in a deployment."""

    __tablename__ = "deployment_targets"

    deployment_id: str = Field(
        primary_key=True, max_length=64, foreign_key="deployments.id", ondelete="CASCADE"
    )
    device_id: str = Field(primary_key=True, max_length=64, foreign_key="devices.id", index=True)
    status: str = Field(default="pending", max_length=32, index=True)
    revision: int = Field(default=0, sa_type=sa.BigInteger)
    error: str | None = Field(default=None, sa_type=sa.Text)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    # The deploy command sent for this target, and the seq of the device event last applied to it.
    command_id: str | None = Field(default=None, max_length=64)
    last_seq: int | None = Field(default=None, sa_type=sa.BigInteger)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # A rollout's phase (0-based) that selected the device; None outside rollouts.
    phase: int | None = None
    # The rollback deployment that reverted the device after its rollout was aborted.
    reverted_by: str | None = Field(default=None, max_length=64)


class DeviceGroup(SQLModel, table=True):
    """A named set of devices: static (explicit members) or dynamic (a saved filter over devices).

    A dynamic group's members are whichever devices match its filter when it is evaluated (a
    rollout evaluates it as each phase starts), so devices registered later join it.
    """

    __tablename__ = "device_groups"

    id: str = Field(default_factory=_uuid, primary_key=True, max_length=64)
    name: str = Field(max_length=128, unique=True)
    kind: str = Field(max_length=16)  # static or dynamic
    filter: dict[str, Any] | None = Field(default=None, sa_type=JSONType)
    description: str | None = Field(default=None, max_length=512)
    created_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    created_by: str | None = Field(default=None, max_length=128)
    updated_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)


class DeviceGroupMember(SQLModel, table=True):
    """A device listed in a static group."""

    __tablename__ = "device_group_members"

    group_id: str = Field(primary_key=True, max_length=64, foreign_key="device_groups.id", ondelete="CASCADE")
    device_id: str = Field(
        primary_key=True, max_length=64, foreign_key="devices.id", ondelete="CASCADE", index=True
    )
    added_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)


class Rollout(SQLModel, table=True):
    """A deployment's phased rollout: its strategy, where it stands, and why it stopped."""

    __tablename__ = "rollouts"

    deployment_id: str = Field(
        primary_key=True, max_length=64, foreign_key="deployments.id", ondelete="CASCADE"
    )
    # The validated strategy (kernex.api.rollouts.schemas.RolloutStrategy) and the device selector
    # ({"device_ids"}, {"tags"} or {"group_id"}), evaluated again as each phase starts.
    strategy: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    selector: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    state: str = Field(max_length=32, index=True)
    phase: int = 0  # the current phase, 0-based
    phase_started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # When the current phase reached its success threshold: its soak time runs from here.
    phase_passed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    stop_reason: str | None = Field(default=None, sa_type=sa.Text)
    stopped_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)


class RolloutTransition(SQLModel, table=True):
    """One recorded step of a rollout: a phase started or passed, an approval, an abort, ..."""

    __tablename__ = "rollout_transitions"
    __table_args__ = (sa.Index("ix_rollout_transitions_deployment_at", "deployment_id", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    deployment_id: str = Field(max_length=64, foreign_key="deployments.id", ondelete="CASCADE")
    at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    event: str = Field(max_length=32)
    state: str = Field(max_length=32)  # the rollout's state after it
    phase: int | None = None
    actor: str = Field(max_length=128)
    reason: str | None = Field(default=None, sa_type=sa.Text)
    details: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    # When the rollout feed sent it to integrators (kernex.api.rollouts.feed); None until then.
    published_at: datetime | None = Field(default=None, sa_type=UTCDateTime, index=True)


class DeviceConfig(SQLModel, table=True):
    """One version of a device's desired configuration; older versions are its history."""

    __tablename__ = "device_configs"

    device_id: str = Field(primary_key=True, max_length=64, foreign_key="devices.id", ondelete="CASCADE")
    version: int = Field(primary_key=True, sa_type=sa.BigInteger)
    # What the device is sent: the fleet defaults merged with its overrides.
    values: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    created_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    created_by: str | None = Field(default=None, max_length=128)
    # The device's own settings at this version, and the fleet defaults version merged under them.
    overrides: dict[str, Any] = Field(
        default_factory=dict, sa_type=JSONType, sa_column_kwargs={"server_default": "{}"}
    )
    defaults_version: int | None = Field(default=None, sa_type=sa.BigInteger)


class FleetConfig(SQLModel, table=True):
    """One version of the fleet-wide configuration defaults; the highest version is in effect."""

    __tablename__ = "fleet_configs"

    version: int = Field(primary_key=True, sa_type=sa.BigInteger, sa_column_kwargs={"autoincrement": False})
    values: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    created_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    created_by: str | None = Field(default=None, max_length=128)


class DeviceCommand(SQLModel, table=True):
    """A signed command issued to a device, and where it stands on the broker.

    The newest command of a (device, kind) is the one retained on its topic; `state` says
    whether it still has to be published (`pending`), is on the broker (`published`), has to be
    cleared (`clearing`: an empty retained message removes it) or was (`cleared`), or was
    replaced by a newer command before it was published (`superseded`).
    """

    __tablename__ = "device_commands"
    __table_args__ = (sa.Index("ix_device_commands_device_kind", "device_id", "kind", "revision"),)

    id: str = Field(primary_key=True, max_length=64)
    device_id: str = Field(max_length=64, foreign_key="devices.id", ondelete="CASCADE")
    kind: str = Field(max_length=16)
    revision: int = Field(sa_type=sa.BigInteger)
    state: str = Field(max_length=16, index=True)
    token: str = Field(sa_type=sa.Text)
    deployment_id: str | None = Field(
        default=None, max_length=64, foreign_key="deployments.id", ondelete="CASCADE"
    )
    config_version: int | None = Field(default=None, sa_type=sa.BigInteger)
    issued_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    published_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    cleared_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class DeviceBundleHistory(SQLModel, table=True):
    """Which bundle a device ran, from which deployment, with what result."""

    __tablename__ = "device_bundle_history"
    __table_args__ = (sa.Index("ix_device_bundle_history_device", "device_id", "started_at"),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=64, foreign_key="devices.id", ondelete="CASCADE")
    bundle_id: str = Field(max_length=64, foreign_key="bundles.id")
    version: str = Field(max_length=64)
    deployment_id: str | None = Field(default=None, max_length=64, foreign_key="deployments.id")
    result: str = Field(max_length=32)
    started_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class User(SQLModel, table=True):
    """An operator account."""

    __tablename__ = "users"

    id: str = Field(default_factory=_uuid, primary_key=True, max_length=64)
    username: str = Field(max_length=128, unique=True)
    password_hash: str = Field(max_length=512)
    role: str = Field(max_length=16)
    disabled: bool = False
    # Bumped on logout-everywhere or password change: tokens carrying an older value are refused.
    token_version: int = 0
    created_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)


class AuditEntry(SQLModel, table=True):
    """Who did what to which target, when, from where, and how it ended."""

    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=_now, sa_type=UTCDateTime, index=True)
    actor: str = Field(max_length=128, index=True)
    action: str = Field(max_length=64, index=True)
    target: str | None = Field(default=None, max_length=256)
    address: str | None = Field(default=None, max_length=64)
    outcome: str = Field(max_length=16)
    details: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)


class ApiToken(SQLModel, table=True):
    """A token for integrators and CI: `kx_<id>_<secret>`, of which only the secret's SHA-256 is kept."""

    __tablename__ = "api_tokens"

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=128)
    # "read" (viewer) or "operator": an API token never carries admin rights.
    scope: str = Field(max_length=16)
    secret_sha256: str = Field(max_length=64)
    created_by: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class RevokedAccessToken(SQLModel, table=True):
    """An operator access token signed out before its expiry (jti denylist); pruned once expired."""

    __tablename__ = "revoked_access_tokens"

    jti: str = Field(primary_key=True, max_length=64)
    expires_at: datetime = Field(sa_type=UTCDateTime, index=True)


class EnrollmentToken(SQLModel, table=True):
    """An operator-made token that admits registering devices under the `token` admission policy.

    Format `kxe_<id>_<secret>`; only the secret's SHA-256 is kept. `uses` only grows and is bumped
    with a conditional UPDATE, so concurrent registrations never exceed `max_uses`.
    """

    __tablename__ = "enrollment_tokens"

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=128)
    secret_sha256: str = Field(max_length=64)
    # Tags every device it admits receives.
    tags: list[str] = Field(default_factory=list, sa_type=JSONType)
    max_uses: int | None = None
    uses: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_by: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class DevicePreauthorization(SQLModel, table=True):
    """A device key an operator admitted before its first contact (by public-key fingerprint)."""

    __tablename__ = "device_preauthorizations"

    key_fingerprint: str = Field(primary_key=True, max_length=64)
    name: str | None = Field(default=None, max_length=128)
    tags: list[str] = Field(default_factory=list, sa_type=JSONType)
    created_by: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    # The device it admitted, once it registered.
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    device_id: str | None = Field(default=None, max_length=64)


class Webhook(SQLModel, table=True):
    """An operator's HTTPS endpoint for fleet event types, with the HMAC secret it verifies."""

    __tablename__ = "webhooks"

    id: str = Field(default_factory=_uuid, primary_key=True, max_length=32)
    url: str = Field(max_length=2048)
    event_types: list[str] = Field(default_factory=list, sa_type=JSONType)
    # Fernet-encrypted (the key is the API's webhook_secret_key): HMAC needs the secret itself.
    secret_encrypted: str = Field(max_length=512)
    created_by: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)


class WebhookDelivery(SQLModel, table=True):
    """One event for one webhook: the outbox row, written in the transaction of its data."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: str = Field(default_factory=_uuid, primary_key=True, max_length=32)
    webhook_id: str = Field(
        sa_column=sa.Column(sa.String(32), sa.ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    )
    event_type: str = Field(max_length=64)
    body: str  # the exact JSON bytes (UTF-8) that are signed and sent
    status: str = Field(default="pending", max_length=16)  # pending, succeeded, failed
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    # A dispatcher owns the row until then (cluster-safe claiming by conditional UPDATE).
    claimed_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=1024)
    created_at: datetime = Field(default_factory=_now, sa_type=UTCDateTime)
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
