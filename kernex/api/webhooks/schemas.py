"""Request and response bodies of /api/v1/webhooks."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

EventType = Literal["heartbeat", "status", "deployments", "config", "events", "rollouts"]


class WebhookCreate(BaseModel):
    """A URL and the fleet event types it receives."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl
    event_types: Annotated[list[EventType], Field(min_length=1, max_length=6)]


class WebhookOut(BaseModel):
    """A webhook, never its secret."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    url: str
    event_types: list[str]
    created_by: str
    created_at: datetime


class WebhookCreated(WebhookOut):
    """A new webhook with its signing secret: shown in this response only."""

    secret: str


class WebhookPage(BaseModel):
    """Every webhook."""

    items: list[WebhookOut]


class DeliveryOut(BaseModel):
    """One delivery: what was sent, how it went."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    webhook_id: str
    event_type: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class DeliveryPage(BaseModel):
    """A webhook's deliveries, newest first."""

    items: list[DeliveryOut]
