"""Verified device messages, as the writer stores them.

Whoever verified a message (ingest for MQTT, the API for its HTTP fallback) hands these to
`kernex.storage.writer.BatchWriter`; being plain data, they let both share one write path.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TypeAlias

from kernex.protocol.messages import ConnectionStatus, Event, Heartbeat


@dataclass(frozen=True, slots=True)
class VerifiedHeartbeat:
    """A heartbeat whose signature, topic, schema and timestamp checked out."""

    device_id: str
    claims: Heartbeat
    received_at: datetime


@dataclass(frozen=True, slots=True)
class VerifiedEvent:
    """A device event whose signature, topic, schema and timestamp checked out."""

    device_id: str
    claims: Event
    received_at: datetime


@dataclass(frozen=True, slots=True)
class VerifiedStatus:
    """An online/offline status of a known, admitted device.

    `ts` orders it against the device's other statuses and heartbeats. For "online" it is the
    device's timestamp (the receive time if there is none). For "offline" it is the later of
    the two: the broker publishes the Last Will when the connection dies, but its payload (and
    ts) was fixed at connect time, before the "online" and every heartbeat of that connection;
    taken at face value, a Will could never win. The receive time is when the platform learnt
    the connection was gone. The cost: a queued "offline" replayed late (a worker catching up)
    counts as recent, and the device shows offline until its next live heartbeat.
    """

    device_id: str
    status: ConnectionStatus
    ts: datetime
    received_at: datetime


Verified: TypeAlias = VerifiedHeartbeat | VerifiedEvent | VerifiedStatus
