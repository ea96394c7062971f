"""The HTTP fallback: verify a device's signed message like ingest does, store it like ingest does.

The checks are kernex.protocol.verify's and the write is kernex.storage.writer's, the same code
ingest runs for MQTT messages: a heartbeat that arrives over HTTPS is stored exactly like one
that came through the broker, once per (device, seq), and so are events (deployment progress
and config_applied reports are applied the same way). The writer's normalized fleet messages
go to webhooks with the commit (its outbox) and, after it, to integrators on the fleet topics,
published by the API as ingest would (`republish`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.broker_link import BrokerLink, BrokerUnavailableError
from kernex.api.commands import service as commands
from kernex.api.errors import ApiError, NotFoundError, ServiceUnavailableError
from kernex.kit.logs import get_logger
from kernex.protocol.exceptions import InvalidKeyError
from kernex.protocol.fleet import FLEET_QOS, FleetMessage, encode, fleet_topic
from kernex.protocol.keys import PublicKey, load_public_key_pem
from kernex.protocol.messages import Heartbeat
from kernex.protocol.topics import CommandKind, Topics
from kernex.protocol.verify import ClockLimits, MessageRejected, SignedKind, verify_signed
from kernex.storage.configs import reported_config_version
from kernex.storage.deployments import ACTIVE_TARGET_STATUSES
from kernex.storage.exceptions import WriteError
from kernex.storage.fleet import channel_of
from kernex.storage.models import DeploymentTarget, Device
from kernex.storage.records import VerifiedEvent, VerifiedHeartbeat
from kernex.storage.writer import BatchWriter

log = get_logger(__name__)

JOSE_MEDIA_TYPE = "application/jose"  # RFC 7515 §9.2.1: a JWS in compact serialization


class UnsupportedMediaTypeError(ApiError):
    """The body is not a compact JWS (application/jose)."""

    status_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    code = "unsupported_media_type"


class MessageTooLargeError(ApiError):
    """The message is over the size the broker would accept (KERNEX_MQTT_MAX_PACKET_SIZE)."""

    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "message_too_large"


class MessageRefusedError(ApiError):
    """The signed message failed verification; the message starts with ingest's reject reason."""

    status_code = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "message_rejected"


@dataclass(frozen=True)
class Received:
    """A verified message: whether it was new, and the fleet messages its commit produced."""

    stored: bool
    fleet: tuple[FleetMessage, ...]


def check_media_type(content_type: str | None) -> None:
    """Refuse anything but application/jose."""
    if (content_type or "").split(";", 1)[0].strip().lower() != JOSE_MEDIA_TYPE:
        raise UnsupportedMediaTypeError(f"send the signed message as {JOSE_MEDIA_TYPE} (compact JWS)")


async def receive(
    session: AsyncSession,
    engine: AsyncEngine,
    *,
    device_id: str,
    payload: bytes,
    kind: SignedKind,
    clock: ClockLimits,
    max_bytes: int,
) -> Received:
    """Verify and store one signed message from the device (stored False: a repeat)."""
    if len(payload) > max_bytes:
        raise MessageTooLargeError(f"{len(payload)} bytes > {max_bytes}")
    device = await session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id} not found")
    received_at = datetime.now(UTC)
    try:
        claims = verify_signed(
            payload,
            kind=kind,
            device_id=device_id,
            public_key=_public_key(device),
            received_at=received_at,
            clock=clock,
        )
    except MessageRejected as exc:
        raise MessageRefusedError(f"{exc.reason.value}: {exc.detail}") from None
    if isinstance(claims, Heartbeat):
        record: VerifiedHeartbeat | VerifiedEvent = VerifiedHeartbeat(device_id, claims, received_at)
    else:
        record = VerifiedEvent(device_id, claims, received_at)
    try:
        result = await BatchWriter(engine).write([record])
    except WriteError as exc:
        raise ServiceUnavailableError(f"not stored, retry: {exc}") from None
    tally = result.heartbeats if kind is SignedKind.HEARTBEAT else result.events
    return Received(stored=tally.stored == 1, fleet=tuple(result.fleet))


async def republish(broker: BrokerLink, topics: Topics, messages: Sequence[FleetMessage]) -> int:
    """Publish committed fleet messages for integrators; how many the broker took.

    The message is stored and its webhooks queued whatever happens here: a broker that is down
    costs integrators these messages (logged), never the device its answer.
    """
    published = 0
    for message in messages:
        topic = fleet_topic(topics, message.device_id, channel_of(message))
        try:
            await broker.publish(topic, encode(message), retain=False, qos=FLEET_QOS)
        except BrokerUnavailableError as exc:
            log.warning(
                "fleet message of an HTTP fallback report not published",
                device_id=message.device_id,
                topic=topic,
                error=str(exc),
            )
            continue
        published += 1
    return published


def _public_key(device: Device) -> PublicKey | None:
    try:
        return load_public_key_pem(device.public_key_pem)
    except InvalidKeyError:
        return None  # verification then refuses the message (bad_signature), as ingest does


async def outstanding_commands(session: AsyncSession, device_id: str) -> list[str]:
    """The signed commands the device has yet to finish, oldest revision first.

    Its current deploy command while its target in that deployment is not finished; its current
    config command while it has not reported running that version.
    """
    now = datetime.now(UTC)
    device = await session.get(Device, device_id, populate_existing=True)
    if device is None:
        raise NotFoundError(f"device {device_id} not found")
    reported = reported_config_version(
        heartbeat_version=device.config_version,
        heartbeat_seq=device.last_seq,
        applied_version=device.config_applied_version,
        applied_seq=device.config_applied_seq,
    )
    tokens: list[tuple[int, str]] = []
    for command in await commands.standing(session, device_id, now):
        if command.kind == CommandKind.DEPLOY:
            status = (
                await session.exec(
                    select(DeploymentTarget.status).where(
                        col(DeploymentTarget.deployment_id) == command.deployment_id,
                        col(DeploymentTarget.device_id) == device_id,
                    )
                )
            ).first()
            if status in ACTIVE_TARGET_STATUSES:
                tokens.append((command.revision, command.token))
        elif reported is None or (command.config_version or 0) > reported:
            tokens.append((command.revision, command.token))
    return [token for _, token in sorted(tokens)]
