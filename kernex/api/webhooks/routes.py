"""`/api/v1/webhooks`: register, list and delete webhooks, and read their delivery log (operators)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status

from kernex.api.audit import service as audit
from kernex.api.auth.deps import OperatorDep, ViewerDep
from kernex.api.deps import SessionDep
from kernex.api.webhooks import service
from kernex.api.webhooks.dispatcher import lifespan, secret_box
from kernex.api.webhooks.schemas import (
    DeliveryOut,
    DeliveryPage,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
    WebhookPage,
)

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"], lifespan=lifespan)


@router.post(
    "", response_model=WebhookCreated, status_code=status.HTTP_201_CREATED, operation_id="createWebhook"
)
async def create_webhook(
    body: WebhookCreate, operator: OperatorDep, request: Request, session: SessionDep
) -> WebhookCreated:
    """Register a URL for event types; the signing secret is in this response only."""
    row, secret = await service.create(
        session,
        secret_box(request.app),
        url=str(body.url),
        event_types=list(body.event_types),
        created_by=operator.actor,
    )
    await audit.record(
        session,
        actor=operator,
        action="webhook.create",
        target=f"webhook:{row.id}",
        outcome="success",
        request=request,
        details={"url": row.url, "event_types": row.event_types},
    )
    return WebhookCreated(**WebhookOut.model_validate(row).model_dump(), secret=secret)


@router.get("", response_model=WebhookPage, operation_id="listWebhooks")
async def list_webhooks(_: ViewerDep, session: SessionDep) -> WebhookPage:
    """Every webhook (never its secret), newest first."""
    return WebhookPage(items=[WebhookOut.model_validate(w) for w in await service.list_webhooks(session)])


@router.delete("/{webhook_id}", response_model=WebhookOut, operation_id="deleteWebhook")
async def delete_webhook(
    webhook_id: str, operator: OperatorDep, request: Request, session: SessionDep
) -> WebhookOut:
    """Delete a webhook; its pending deliveries are dropped."""
    target = f"webhook:{webhook_id}"
    async with audit.audited(
        session, actor=operator, action="webhook.delete", target=target, request=request
    ):
        row = await service.delete(session, webhook_id)
    out = WebhookOut.model_validate(row)
    await audit.record(
        session, actor=operator, action="webhook.delete", target=target, outcome="success", request=request
    )
    return out


@router.get("/{webhook_id}/deliveries", response_model=DeliveryPage, operation_id="listWebhookDeliveries")
async def list_deliveries(
    webhook_id: str,
    _: ViewerDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=service.DELIVERY_PAGE_MAX)] = 100,
) -> DeliveryPage:
    """The delivery log: status, attempts, last status code and error, newest first."""
    rows = await service.deliveries(session, webhook_id, limit)
    return DeliveryPage(items=[DeliveryOut.model_validate(d) for d in rows])
