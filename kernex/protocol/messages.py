"""Message schemas of the wire contract (DESIGN.md "Message format").

Unknown fields are ignored so an older server accepts a newer agent's additions; every number is
bounded so a hostile payload cannot overflow a database column. Signed messages and registration
answers state their protocol version (kernex.protocol.version); without it they are version 1.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from kernex.protocol.exceptions import MessageError
from kernex.protocol.version import LEGACY_PROTOCOL_VERSION, Version

BIGINT_MAX = 2**63 - 1  # Postgres BIGINT: seq, revisions and counters must fit
ID_MAX_LEN = 128
SHORT_TEXT = 64

Seq = Annotated[int, Field(ge=0, le=BIGINT_MAX, strict=True)]
NonNegative = Annotated[float, Field(ge=0, le=1e15, allow_inf_nan=False)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Metrics(_Message):
    """Resource figures a device reports in each heartbeat."""

    cpu_percent: Annotated[float, Field(ge=0, le=100 * 1024, allow_inf_nan=False)] = 0.0
    memory_mb: NonNegative = 0.0
    disk_free_mb: NonNegative = 0.0
    uptime_s: NonNegative = 0.0


class BundleRef(_Message):
    """The bundle a device runs."""

    id: Annotated[str, Field(min_length=1, max_length=ID_MAX_LEN)]
    version: Annotated[str, Field(min_length=1, max_length=SHORT_TEXT)]


class Heartbeat(_Message):
    """Claims of a signed heartbeat."""

    device_id: Annotated[str, Field(min_length=1, max_length=ID_MAX_LEN)]
    seq: Seq
    ts: AwareDatetime
    status: Annotated[str, Field(min_length=1, max_length=SHORT_TEXT)] = "ok"
    metrics: Metrics = Metrics()
    bundle: BundleRef | None = None
    config_version: Annotated[int, Field(ge=0, le=BIGINT_MAX)] | None = None
    agent_version: Annotated[str, Field(max_length=SHORT_TEXT)] = ""
    # The protocol version the agent speaks (kernex.protocol.version); absent from older agents.
    v: Version = LEGACY_PROTOCOL_VERSION


class Event(_Message):
    """Claims of a signed device event (deployment progress, config applied, ...)."""

    device_id: Annotated[str, Field(min_length=1, max_length=ID_MAX_LEN)]
    seq: Seq
    ts: AwareDatetime
    type: Annotated[str, Field(min_length=1, max_length=SHORT_TEXT)]
    data: dict[str, Any] = Field(default_factory=dict)
    # The protocol version the agent speaks (kernex.protocol.version); absent from older agents.
    v: Version = LEGACY_PROTOCOL_VERSION


class ConnectionStatus(StrEnum):
    """A device's connection state as its retained status topic says."""

    ONLINE = "online"
    OFFLINE = "offline"


class StatusMessage(_Message):
    """The unsigned, retained status payload; "offline" is the device's Last Will."""

    status: ConnectionStatus
    ts: AwareDatetime | None = None


class RejectReason(StrEnum):
    """Why ingest refused a device message (a Prometheus label: keep the set small and fixed)."""

    UNKNOWN_DEVICE = "unknown_device"
    REVOKED_DEVICE = "revoked_device"
    TOPIC_MISMATCH = "topic_mismatch"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    CLOCK_SKEW = "clock_skew"
    UNSUPPORTED_VERSION = "unsupported_version"


def parse_heartbeat(payload: bytes) -> Heartbeat:
    """Validate heartbeat claims; raises MessageError."""
    return _parse(Heartbeat, payload)


def parse_event(payload: bytes) -> Event:
    """Validate event claims; raises MessageError."""
    return _parse(Event, payload)


def parse_status(payload: bytes) -> StatusMessage:
    """Validate a status payload; raises MessageError."""
    return _parse(StatusMessage, payload)


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], payload: bytes) -> M:
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise MessageError(f"{where}: {first['msg']}") from None


def utc_now() -> datetime:
    """Aware UTC now."""
    return datetime.now(UTC)


def format_ts(value: datetime) -> str:
    """RFC 3339 UTC with milliseconds and a Z, as in DESIGN.md's examples."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


# --- Registration (REST, but both sides speak it) -------------------------------------------


class RegistrationRequest(BaseModel):
    """`POST /api/v1/devices/register`."""

    model_config = ConfigDict(extra="forbid")

    csr: Annotated[str, Field(min_length=1, max_length=16_384)]
    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    hardware: dict[str, Any] | None = None
    # Under the `token` admission policy, an operator-made token admits the device at once.
    enrollment_token: Annotated[str, Field(min_length=1, max_length=256)] | None = None


class MqttEndpoint(BaseModel):
    """Where and how a device reaches the broker."""

    host: str
    port: int
    topic_prefix: str


class CommandKey(BaseModel):
    """A control-plane public key the device pins to verify commands."""

    kid: str
    alg: str
    public_key_pem: str


class RegistrationResponse(BaseModel):
    """What a device receives when it registers."""

    device_id: str
    status: Literal["active", "pending", "rejected", "revoked"]
    certificate: str | None
    ca_certificate: str
    mqtt: MqttEndpoint
    command_keys: list[CommandKey]
    # The version of the key set command_keys is (kernex.protocol.commands.KeySet); a signed set
    # is taken up only when newer. 0: the first key, never rotated (and older servers).
    command_keys_version: Annotated[int, Field(ge=0, le=BIGINT_MAX)] = 0
    # Keys that sign bundle releases; agents verify every bundle against these before extracting.
    release_keys: list[CommandKey] = Field(default_factory=list)
    # The server's protocol version and the oldest agent protocol it accepts; absent from older
    # servers, which spoke version 1 (kernex.protocol.version.check_server decides).
    protocol_version: Version = LEGACY_PROTOCOL_VERSION
    min_protocol_version: Version = LEGACY_PROTOCOL_VERSION
