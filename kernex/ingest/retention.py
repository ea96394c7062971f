"""The heartbeat retention task every ingest worker runs (kernex.storage.partitions does the work).

Hourly: creates the coming days' partitions on PostgreSQL and removes heartbeats older than
KERNEX_HEARTBEAT_RETENTION_DAYS. Several workers may run it: one takes the maintenance lock
each round, the others skip. A failed round is logged and retried at the next one; ingest
never stops for it (a week of partitions is always made ahead, see PREMAKE_DAYS).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.kit.logs import get_logger
from kernex.storage.partitions import maintain_heartbeats

# Partitions are days and made a week ahead: hourly is frequent enough to drop an expired day
# within the hour, and the work is a few catalogue queries.
MAINTENANCE_INTERVAL_S = 3600.0

log = get_logger(__name__)


async def run_retention(
    engine: AsyncEngine, retention_days: int, interval_s: float = MAINTENANCE_INTERVAL_S
) -> None:
    """Maintain heartbeat partitions and retention now and every interval_s, until cancelled."""
    while True:
        try:
            await maintain_heartbeats(engine, now=datetime.now(UTC), retention_days=retention_days)
        except (OSError, sa.exc.SQLAlchemyError) as exc:
            log.warning("heartbeat retention failed; retrying next round", error=str(exc))
        await asyncio.sleep(interval_s)
