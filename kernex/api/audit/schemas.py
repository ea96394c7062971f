"""Bodies of the audit domain."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class AuditEntryOut(BaseModel):
    """One audit entry."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    address: str | None
    outcome: str
    details: dict[str, Any]


class AuditPage(BaseModel):
    """Entries newest first."""

    items: list[AuditEntryOut]
    total: int
    limit: int
    offset: int
