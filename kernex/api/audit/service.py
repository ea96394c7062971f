"""The audit log: who did what to which target, when, from where, and how it ended."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from fastapi import Request
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.auth.schemas import Principal
from kernex.api.clients import client_address
from kernex.api.errors import ApiError
from kernex.kit.logs import get_logger
from kernex.storage.models import AuditEntry

log = get_logger(__name__)

ACTOR_MAX = 128  # the column's width
TARGET_MAX = 256


async def record(
    session: AsyncSession,
    *,
    actor: Principal | str,
    action: str,
    target: str | None,
    outcome: str,
    request: Request | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Write one audit entry and commit.

    The commit covers whatever else the session holds, so call this right after (or instead of)
    the mutation's own commit; a refused attempt is recorded with its own commit.
    `actor` is the caller, or a plain name such as "system" or "device:<id>".
    """
    name = actor.actor if isinstance(actor, Principal) else actor
    entry = AuditEntry(
        actor=name[:ACTOR_MAX],
        action=action,
        target=target[:TARGET_MAX] if target is not None else None,
        address=client_address(request) if request is not None else None,
        outcome=outcome,
        details=details or {},
    )
    session.add(entry)
    await session.commit()
    log.info("audit", actor=entry.actor, action=action, target=entry.target, outcome=outcome)


async def search(
    session: AsyncSession,
    *,
    actor: str | None,
    action: str | None,
    target: str | None,
    outcome: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    offset: int,
) -> tuple[list[AuditEntry], int]:
    """Entries newest first matching every given filter (exact match), with the total count."""
    query = select(AuditEntry)
    count = select(func.count()).select_from(AuditEntry)
    conditions = []
    if actor is not None:
        conditions.append(col(AuditEntry.actor) == actor)
    if action is not None:
        conditions.append(col(AuditEntry.action) == action)
    if target is not None:
        conditions.append(col(AuditEntry.target) == target)
    if outcome is not None:
        conditions.append(col(AuditEntry.outcome) == outcome)
    if since is not None:
        conditions.append(col(AuditEntry.at) >= since)
    if until is not None:
        conditions.append(col(AuditEntry.at) < until)
    total = (await session.exec(count.where(*conditions))).one()
    rows = await session.exec(
        query.where(*conditions)
        .order_by(col(AuditEntry.at).desc(), col(AuditEntry.id).desc())
        .limit(limit)
        .offset(offset)
    )
    return list(rows.all()), total


@asynccontextmanager
async def audited(
    session: AsyncSession,
    *,
    actor: Principal | str,
    action: str,
    target: str | None,
    request: Request | None,
    refused: str = "failed",
) -> AsyncIterator[None]:
    """Record a refused or failed mutation; the successful one records itself with its commit.

    `refused` is the outcome written when the body raises: "failed" for a mutation the caller
    may retry, "denied" for a credential check (login, password change).
    """
    try:
        yield
    except ApiError as exc:
        await session.rollback()
        await record(
            session,
            actor=actor,
            action=action,
            target=target,
            outcome=refused,
            request=request,
            details={"error": str(exc)[:1000], "code": exc.code, "status": int(exc.status_code)},
        )
        raise


@asynccontextmanager
async def recorded(
    session: AsyncSession,
    *,
    actor: Principal | str,
    action: str,
    target: str | None,
    request: Request | None,
    refused: str = "failed",
) -> AsyncIterator[dict[str, Any]]:
    """Audit a mutation however it ends: refused or failed as `audited` records it, or, once the
    body is done, a success with the details the body put into the yielded dict."""
    details: dict[str, Any] = {}
    async with audited(session, actor=actor, action=action, target=target, request=request, refused=refused):
        yield details
    await record(
        session,
        actor=actor,
        action=action,
        target=target,
        outcome="success",
        request=request,
        details=details,
    )
