"""Announcing revocations: fleet status "revoked" for integrators and webhooks.

The API revokes a device in the database (kernex.api.devices.revocation); only ingest may write
the fleet topics, so ingest tells integrators. Every worker looks every `interval_s` for revoked
devices not yet announced (an indexed query that finds nothing almost always). Whichever worker
claims a device (`revocation_announced_at` set where it was NULL) announces it: in the claim's
transaction it records the status change (device_status_changes) and the webhook deliveries
(kernex.storage.webhooks), so N workers announce each revocation once, and the webhooks get it
with the history or not at all. After the commit it queues the fleet message on its MQTT
client (paho keeps a QoS 1 message across a reconnect); a worker killed between the commit
and the queueing loses that one MQTT message, never the history or the webhooks.

The claiming worker also drops the device from its key cache; ingest refuses messages from a
revoked device without it anyway (kernex.ingest.keys reads admission states on every batch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.ingest.keys import KeyCache
from kernex.ingest.metrics import IngestMetrics
from kernex.kit.logs import get_logger
from kernex.protocol.fleet import FLEET_QOS, FleetChannel, FleetStatus, encode, fleet_topic
from kernex.protocol.topics import Topics
from kernex.storage.models import AdmissionState, Device, DeviceStatusChange
from kernex.storage.webhooks import enqueue

log = get_logger(__name__)

CLAIM_BATCH = 500  # revocations announced per pass; a mass revocation takes a few passes
REVOKED_REASON = "revoked"  # `reason` of the status change and the fleet message

_DEVICES: sa.Table = Device.__table__  # type: ignore[attr-defined]  # SQLModel sets it at class creation
_STATUS_CHANGES: sa.Table = DeviceStatusChange.__table__  # type: ignore[attr-defined]  # as above

# Queues one fleet message (topic, payload, QoS); True if paho took it.
Publish = Callable[[str, bytes, int], bool]


class RevocationAnnouncer:
    """Claims revoked devices not yet announced and announces each once."""

    def __init__(
        self,
        engine: AsyncEngine,
        topics: Topics,
        keys: KeyCache,
        metrics: IngestMetrics,
        interval_s: float,
    ) -> None:
        self._engine = engine
        self._topics = topics
        self._keys = keys
        self._metrics = metrics
        self._interval_s = interval_s

    async def announce_once(self, publish: Publish) -> list[FleetStatus]:
        """One pass: claim, record and publish what this worker won; returns what it announced."""
        async with self._engine.connect() as conn:
            candidates = (
                await conn.execute(
                    sa.select(_DEVICES.c.id)
                    .where(
                        _DEVICES.c.state == AdmissionState.REVOKED.value,
                        _DEVICES.c.revocation_announced_at.is_(None),
                    )
                    .limit(CLAIM_BATCH)
                )
            ).scalars()
            device_ids = list(candidates)
        if not device_ids:
            return []
        now = datetime.now(UTC)
        announced: list[FleetStatus] = []
        async with self._engine.begin() as conn:
            for device_id in device_ids:
                # The conditional UPDATE is the claim: one worker's succeeds, the others' match nothing.
                claimed = (
                    await conn.execute(
                        sa.update(_DEVICES)
                        .where(_DEVICES.c.id == device_id, _DEVICES.c.revocation_announced_at.is_(None))
                        .values(revocation_announced_at=now)
                        .returning(_DEVICES.c.revoked_at)
                    )
                ).first()
                if claimed is None:
                    continue
                at = claimed.revoked_at or now
                announced.append(
                    FleetStatus(
                        device_id=device_id, status="revoked", ts=at.astimezone(UTC), reason=REVOKED_REASON
                    )
                )
            if announced:
                await conn.execute(
                    sa.insert(_STATUS_CHANGES),
                    [
                        {"device_id": m.device_id, "status": m.status, "at": m.ts, "reason": m.reason}
                        for m in announced
                    ],
                )
                await enqueue(conn, announced)
        dropped = 0
        for message in announced:
            self._keys.invalidate(message.device_id)
            topic = fleet_topic(self._topics, message.device_id, FleetChannel.STATUS)
            if not publish(topic, encode(message), FLEET_QOS):
                dropped += 1
        if announced:
            self._metrics.fleet_published.inc(len(announced) - dropped)
            log.info("revocations announced", devices=[m.device_id for m in announced])
        if dropped:
            self._metrics.fleet_dropped.inc(dropped)
            log.warning("revocation announcements dropped: the publish queue is full", dropped=dropped)
        return announced

    async def run(self, publish: Publish) -> None:
        """Announce every interval until cancelled; a database outage pauses it, never stops it."""
        while True:
            try:
                await self.announce_once(publish)
            except (OSError, sa.exc.SQLAlchemyError) as exc:
                self._metrics.db_errors.inc()
                log.warning("revocation announcements paused: database unavailable", error=str(exc))
            await asyncio.sleep(self._interval_s)
