"""Normalized fleet messages of a committed batch: what integrators and webhooks receive.

The writer builds them inside the batch's transaction (so webhook deliveries are written with
the data, kernex.storage.webhooks) and returns them for ingest to republish on MQTT.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Protocol

from kernex.protocol.fleet import (
    FleetChannel,
    FleetEvent,
    FleetHeartbeat,
    FleetMessage,
    FleetStatus,
    event_channel,
)
from kernex.storage.records import Verified, VerifiedEvent, VerifiedHeartbeat


class StatusChangeLike(Protocol):
    """A recorded status change (kernex.storage.writer.StatusChange)."""

    @property
    def device_id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def at(self) -> datetime: ...
    @property
    def reason(self) -> str: ...


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def channel_of(message: FleetMessage) -> FleetChannel:
    """The fleet topic level (and webhook event type) of a message."""
    if isinstance(message, FleetHeartbeat):
        return FleetChannel.HEARTBEAT
    if isinstance(message, FleetStatus):
        return FleetChannel.STATUS
    return event_channel(message.type)


def normalize(
    records: Iterable[Verified], present: frozenset[str], changes: Iterable[StatusChangeLike]
) -> list[FleetMessage]:
    """Heartbeats and events of devices present at commit (once per (device_id, seq) within the
    batch, as stored), then the status changes recorded."""
    out: list[FleetMessage] = []
    seen: set[tuple[type, str, int]] = set()
    for record in records:
        if record.device_id not in present or not isinstance(record, VerifiedHeartbeat | VerifiedEvent):
            continue
        key = (type(record), record.device_id, record.claims.seq)
        if key in seen:
            continue  # twice in one batch: the writer stored the first copy
        seen.add(key)
        if isinstance(record, VerifiedHeartbeat):
            c = record.claims
            out.append(
                FleetHeartbeat(
                    device_id=record.device_id,
                    seq=c.seq,
                    ts=_utc(c.ts),
                    received_at=_utc(record.received_at),
                    status=c.status,
                    metrics=c.metrics,
                    bundle=c.bundle,
                    config_version=c.config_version,
                    agent_version=c.agent_version,
                )
            )
        else:
            e = record.claims
            out.append(
                FleetEvent(
                    type=e.type,
                    device_id=record.device_id,
                    seq=e.seq,
                    ts=_utc(e.ts),
                    received_at=_utc(record.received_at),
                    data=e.data,
                )
            )
    out.extend(
        FleetStatus.model_validate(
            {"device_id": ch.device_id, "status": ch.status, "ts": _utc(ch.at), "reason": ch.reason}
        )
        for ch in changes
    )
    return out
