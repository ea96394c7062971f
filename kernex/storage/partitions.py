"""Heartbeat retention, and the daily time partitions of the heartbeats table on PostgreSQL.

On PostgreSQL (migration 0008) `heartbeats` is partitioned by range of `ts`: one partition per
UTC day, `heartbeats_pYYYYMMDD`, and `heartbeats_default` for rows outside all of them (a
device's buffered heartbeats older than the oldest day kept, or rows from before the
migration). Queries bounded in time read only the partitions they need, and retention drops
whole days, a catalogue operation instead of a DELETE that leaves the table bloated. The
maintenance creates the next PREMAKE_DAYS days ahead of need, so rows always have a partition
even if maintenance stops for a while.

A partition's primary key must contain the partition key, so PostgreSQL's is (device_id, seq,
ts); the writer keeps "one row per (device_id, seq)" by checking before it inserts, under the
device row locks every batch takes (kernex.storage.writer). On SQLite `heartbeats` stays a
plain table and retention deletes rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kernex.kit.logs import get_logger
from kernex.storage.database import is_sqlite
from kernex.storage.types import UTCDateTime

PARENT = "heartbeats"
PARTITION_PREFIX = "heartbeats_p"
DEFAULT_PARTITION = "heartbeats_default"
PREMAKE_DAYS = 7  # a week of partitions ahead: a stopped maintenance task has a week to come back
# Several ingest workers run the maintenance: one takes this transaction-level advisory lock,
# the others skip that round. (An arbitrary constant: "khbret" in ASCII.)
MAINTENANCE_LOCK_KEY = 0x6B6862726574
_PARTITION_NAME = re.compile(rf"{PARTITION_PREFIX}(\d{{8}})")

log = get_logger(__name__)


def partition_name(day: date) -> str:
    """The partition holding the heartbeats of one UTC day."""
    return f"{PARTITION_PREFIX}{day:%Y%m%d}"


def partition_day(name: str) -> date | None:
    """The day a partition holds, or None if the name is not a day partition's."""
    match = _PARTITION_NAME.fullmatch(name)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=UTC).date()


def is_partition(name: str) -> bool:
    """True for the partitions' tables (Alembic compares the parent with the model, not them)."""
    return name == DEFAULT_PARTITION or partition_day(name) is not None


def create_partition_sql(day: date) -> str:
    """DDL for one day's partition; identifiers and bounds come from a date, never from input."""
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF {PARENT} "
        f"FOR VALUES FROM ('{day.isoformat()}T00:00:00+00:00') "
        f"TO ('{(day + timedelta(days=1)).isoformat()}T00:00:00+00:00')"
    )


@dataclass(slots=True)
class RetentionResult:
    """What one maintenance round did."""

    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    deleted: int = 0  # rows deleted (SQLite, or PostgreSQL's default partition)
    skipped: bool = False  # another process held the maintenance lock


async def maintain_heartbeats(engine: AsyncEngine, *, now: datetime, retention_days: int) -> RetentionResult:
    """Create the coming days' partitions and remove heartbeats older than retention_days.

    retention_days 0 keeps everything (partitions are still created ahead).
    """
    cutoff = now.astimezone(UTC) - timedelta(days=retention_days) if retention_days else None
    async with engine.begin() as conn:
        if is_sqlite(str(engine.url)):
            return await _delete_older(conn, PARENT, cutoff)
        lock = sa.text("SELECT pg_try_advisory_xact_lock(:key)")
        if not await conn.scalar(lock, {"key": MAINTENANCE_LOCK_KEY}):
            return RetentionResult(skipped=True)
        if not await _is_partitioned(conn):
            return await _delete_older(conn, PARENT, cutoff)
        existing = await _partitions(conn)
        result = RetentionResult(created=await _create_ahead(conn, existing, now.astimezone(UTC).date()))
        if cutoff is not None:
            result.dropped = await _drop_expired(conn, existing, cutoff)
            if DEFAULT_PARTITION in existing:
                result.deleted = (await _delete_older(conn, DEFAULT_PARTITION, cutoff)).deleted
    if result.created or result.dropped or result.deleted:
        log.info(
            "heartbeat partitions maintained",
            created=result.created,
            dropped=result.dropped,
            deleted=result.deleted,
        )
    return result


async def _create_ahead(conn: AsyncConnection, existing: set[str], today: date) -> list[str]:
    created: list[str] = []
    for offset in range(PREMAKE_DAYS + 1):
        day = today + timedelta(days=offset)
        if partition_name(day) not in existing:
            await conn.execute(sa.text(create_partition_sql(day)))
            created.append(partition_name(day))
    return created


async def _drop_expired(conn: AsyncConnection, existing: set[str], cutoff: datetime) -> list[str]:
    dropped: list[str] = []
    for name in sorted(existing):
        day = partition_day(name)
        # Only whole days older than the cutoff: the day holding it keeps its rows.
        if day is not None and day + timedelta(days=1) <= cutoff.date():
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
            dropped.append(name)
    return dropped


async def _is_partitioned(conn: AsyncConnection) -> bool:
    relkind = await conn.scalar(
        sa.text("SELECT c.relkind::text FROM pg_class c WHERE c.oid = to_regclass(:name)"), {"name": PARENT}
    )
    return bool(relkind == "p")


async def _partitions(conn: AsyncConnection) -> set[str]:
    rows = await conn.execute(
        sa.text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass(:name)"
        ),
        {"name": PARENT},
    )
    return {row[0] for row in rows}


async def _delete_older(conn: AsyncConnection, table: str, cutoff: datetime | None) -> RetentionResult:
    if cutoff is None:
        return RetentionResult()
    # `table` is one of this module's constants.
    statement = sa.text(f"DELETE FROM {table} WHERE ts < :cutoff").bindparams(  # noqa: S608
        sa.bindparam("cutoff", type_=UTCDateTime())
    )
    result = await conn.execute(statement, {"cutoff": cutoff})
    return RetentionResult(deleted=max(result.rowcount, 0))
