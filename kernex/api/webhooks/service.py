"""Webhook registration and the delivery log (the database side of /api/v1/webhooks)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.errors import NotFoundError
from kernex.api.webhooks.signing import SecretBox, new_secret
from kernex.storage.models import Webhook, WebhookDelivery

DELIVERY_PAGE_MAX = 500


async def create(
    session: AsyncSession, box: SecretBox, *, url: str, event_types: list[str], created_by: str
) -> tuple[Webhook, str]:
    """Register a webhook; returns it and its secret (stored encrypted, returned once)."""
    secret = new_secret()
    row = Webhook(
        url=url,
        event_types=sorted(set(event_types)),
        secret_encrypted=box.encrypt(secret),
        created_by=created_by,
    )
    session.add(row)
    await session.flush()
    return row, secret


async def list_webhooks(session: AsyncSession) -> list[Webhook]:
    """Every webhook, newest first."""
    return list((await session.exec(select(Webhook).order_by(col(Webhook.created_at).desc()))).all())


async def get(session: AsyncSession, webhook_id: str) -> Webhook:
    """One webhook; NotFoundError if there is none."""
    row = await session.get(Webhook, webhook_id)
    if row is None:
        raise NotFoundError(f"no webhook {webhook_id!r}")
    return row


async def delete(session: AsyncSession, webhook_id: str) -> Webhook:
    """Delete a webhook and its deliveries (pending ones are never sent)."""
    row = await get(session, webhook_id)
    await session.exec(sa.delete(WebhookDelivery).where(col(WebhookDelivery.webhook_id) == webhook_id))
    await session.delete(row)
    await session.flush()
    return row


async def deliveries(session: AsyncSession, webhook_id: str, limit: int) -> list[WebhookDelivery]:
    """A webhook's deliveries, newest first."""
    await get(session, webhook_id)
    statement = (
        select(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == webhook_id)
        .order_by(col(WebhookDelivery.created_at).desc(), col(WebhookDelivery.id))
        .limit(min(limit, DELIVERY_PAGE_MAX))
    )
    return list((await session.exec(statement)).all())
