"""The webhook outbox: deliveries written in the same transaction as the data they report.

A delivery is the exact JSON body to send, `{"event": <type>, "data": <fleet message>}`, where
the type is the fleet channel (heartbeat, status, deployments, config, events) or `rollouts`. A dispatcher
outside ingest (kernex.api.webhooks.dispatcher) claims, signs and sends due deliveries, so a
slow or failing endpoint never slows a batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from kernex.protocol.fleet import ROLLOUTS_EVENT, FleetChannel, FleetMessage, FleetRollout
from kernex.storage.fleet import channel_of
from kernex.storage.models import Webhook, WebhookDelivery, _uuid

EVENT_TYPES = (*(c.value for c in FleetChannel), ROLLOUTS_EVENT)

_WEBHOOKS: sa.Table = Webhook.__table__  # type: ignore[attr-defined]  # SQLModel sets it at class creation
_DELIVERIES: sa.Table = WebhookDelivery.__table__  # type: ignore[attr-defined]  # as above


class DeliveryStatus:
    """Values of webhook_deliveries.status."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def _body(event: str, message: FleetMessage | FleetRollout) -> str:
    return json.dumps({"event": event, "data": message.model_dump(mode="json")}, separators=(",", ":"))


def delivery_body(message: FleetMessage) -> str:
    """The JSON a webhook receives for one fleet message."""
    return _body(channel_of(message).value, message)


async def enqueue(conn: AsyncConnection, messages: Sequence[FleetMessage]) -> int:
    """Insert one pending delivery per (webhook, matching message); returns how many."""
    return await _enqueue(conn, [(channel_of(m).value, m) for m in messages])


async def enqueue_rollouts(conn: AsyncConnection, messages: Sequence[FleetRollout]) -> int:
    """Insert one pending delivery per (webhook taking `rollouts`, rollout message)."""
    return await _enqueue(conn, [(ROLLOUTS_EVENT, m) for m in messages])


async def _enqueue(conn: AsyncConnection, events: Sequence[tuple[str, FleetMessage | FleetRollout]]) -> int:
    if not events:
        return 0
    hooks = (await conn.execute(sa.select(_WEBHOOKS.c.id, _WEBHOOKS.c.event_types))).all()
    if not hooks:
        return 0
    now = datetime.now(UTC)
    rows = []
    for event, message in events:
        body: str | None = None
        for hook_id, event_types in hooks:
            if event in event_types:
                body = body or _body(event, message)
                rows.append(
                    {
                        "id": _uuid(),
                        "webhook_id": hook_id,
                        "event_type": event,
                        "body": body,
                        "status": DeliveryStatus.PENDING,
                        "attempts": 0,
                        "next_attempt_at": now,
                        "created_at": now,
                    }
                )
    if rows:
        await conn.execute(sa.insert(_DELIVERIES), rows)
    return len(rows)
