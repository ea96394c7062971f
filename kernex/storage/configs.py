"""Device configuration state shared by the API and ingest: what a device reported applying."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from kernex.protocol.commands import ConfigApplied
from kernex.storage.models import Device

ERROR_MAX_CHARS = 4096  # ConfigApplied.error's own bound, plus the version prefix stays readable

_DEVICES: sa.Table = Device.__table__  # type: ignore[attr-defined]  # SQLModel sets it at class creation


@dataclass(frozen=True, slots=True)
class ConfigReport:
    """One device's `config_applied` event, as ingest verified it."""

    device_id: str
    seq: int
    ts: datetime
    applied: ConfigApplied


async def apply_config_report(conn: AsyncConnection, report: ConfigReport) -> bool:
    """Record the version a device applied (or the error it met); True if it changed anything.

    Ordered by seq like everything a device reports: a report older than the last one applied
    changes nothing. A success clears an earlier error; an error leaves the applied version.
    """
    newer = sa.or_(_DEVICES.c.config_applied_seq.is_(None), _DEVICES.c.config_applied_seq < report.seq)
    applied = report.applied
    if applied.error is None:
        values = {
            "config_applied_version": applied.version,
            "config_applied_seq": report.seq,
            "config_applied_at": report.ts,
            "config_error": None,
        }
    else:
        values = {
            "config_applied_seq": report.seq,
            "config_error": f"version {applied.version}: {applied.error}"[:ERROR_MAX_CHARS],
        }
    result = await conn.execute(
        sa.update(_DEVICES).where(_DEVICES.c.id == report.device_id, newer).values(values)
    )
    return bool(result.rowcount)


def reported_config_version(
    *,
    heartbeat_version: int | None,
    heartbeat_seq: int | None,
    applied_version: int | None,
    applied_seq: int | None,
) -> int | None:
    """The configuration version a device runs: from its newest report, heartbeat or config_applied."""
    if applied_seq is None or applied_version is None:
        return heartbeat_version
    if heartbeat_seq is None or heartbeat_version is None or applied_seq > heartbeat_seq:
        return applied_version
    return heartbeat_version
