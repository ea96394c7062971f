"""`/api/v1/audit`: the audit log, filtered (admins only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import AwareDatetime

from kernex.api.audit import service
from kernex.api.audit.schemas import AuditEntryOut, AuditPage
from kernex.api.auth.deps import AdminDep
from kernex.api.deps import SessionDep

PAGE_MAX = 500  # bounds one response's size and query cost

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


@router.get("", response_model=AuditPage, operation_id="listAuditEntries")
async def list_entries(
    _: AdminDep,
    session: SessionDep,
    actor: Annotated[str | None, Query(max_length=128, description="e.g. user:alice")] = None,
    action: Annotated[str | None, Query(max_length=64, description="e.g. auth.login")] = None,
    target: Annotated[str | None, Query(max_length=256)] = None,
    outcome: Annotated[str | None, Query(max_length=16, description="success, failed or denied")] = None,
    since: Annotated[AwareDatetime | None, Query(description="inclusive")] = None,
    until: Annotated[AwareDatetime | None, Query(description="exclusive")] = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> AuditPage:
    """Audit entries newest first; every filter is an exact match."""
    rows, total = await service.search(
        session,
        actor=actor,
        action=action,
        target=target,
        outcome=outcome,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )
    return AuditPage(
        items=[AuditEntryOut.model_validate(r) for r in rows], total=total, limit=limit, offset=offset
    )
