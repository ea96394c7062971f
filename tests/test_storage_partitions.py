"""Heartbeat partitions and retention (kernex.storage.partitions), and the API's query plans.

The plan test seeds a PostgreSQL database (devices and three days of heartbeats, ANALYZEd),
captures the SQL the API's device services actually send, and EXPLAINs it: index use on the
device list page, device detail and heartbeat history, partition pruning for a bounded history,
and no heartbeat scan for the fleet stats.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.api.devices import service
from kernex.protocol.messages import parse_heartbeat
from kernex.storage.database import create_engine, session_factory
from kernex.storage.partitions import (
    DEFAULT_PARTITION,
    PREMAKE_DAYS,
    create_partition_sql,
    maintain_heartbeats,
    partition_name,
)
from kernex.storage.records import VerifiedHeartbeat
from kernex.storage.writer import BatchWriter
from tests.fixtures.ingest import heartbeat_claims

SEED_DEVICES = 3000
SEED_BEATS_PER_DEVICE = 24  # one every 3 hours over three days: 72,000 rows


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _partitions(url: str) -> set[str]:
    conn = await asyncpg.connect(_dsn(url))
    try:
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'heartbeats'::regclass"
        )
    finally:
        await conn.close()
    return {r["relname"] for r in rows}


async def _add_device(conn: asyncpg.Connection, device_id: str) -> None:
    await conn.execute(
        "INSERT INTO devices (id, key_type, public_key_pem, key_fingerprint, state, status, tags, "
        "registered_at, updated_at, command_revision) "
        "VALUES ($1, 'ed25519', 'pem', $1, 'active', 'unknown', '[]', now(), now(), 0)",
        device_id,
    )


async def _add_beat(conn: asyncpg.Connection, device_id: str, seq: int, ts: datetime) -> None:
    await conn.execute(
        "INSERT INTO heartbeats (device_id, seq, ts, received_at, status, cpu_percent, memory_mb, "
        "disk_free_mb, uptime_s, agent_version) VALUES ($1, $2, $3, $3, 'ok', 1, 1, 1, 1, 'x')",
        device_id,
        seq,
        ts,
    )


async def test_postgres_heartbeats_are_partitioned_by_day_from_the_migration(pg_url: str) -> None:
    today = datetime.now(UTC).date()
    partitions = await _partitions(pg_url)
    assert DEFAULT_PARTITION in partitions
    assert {partition_name(today + timedelta(days=n)) for n in range(PREMAKE_DAYS + 1)} <= partitions
    conn = await asyncpg.connect(_dsn(pg_url))
    try:
        assert await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'heartbeats'") == "p"
        await _add_device(conn, "d1")
        now = datetime.now(UTC)
        await _add_beat(conn, "d1", 1, now)
        await _add_beat(conn, "d1", 2, now - timedelta(days=40))  # older than every day partition
        placed = dict(await conn.fetch("SELECT seq, tableoid::regclass::text FROM heartbeats"))
    finally:
        await conn.close()
    assert placed == {1: partition_name(now.date()), 2: DEFAULT_PARTITION}


async def test_retention_drops_expired_days_and_creates_the_coming_ones(pg_url: str) -> None:
    now = datetime.now(UTC)
    conn = await asyncpg.connect(_dsn(pg_url))
    try:
        await _add_device(conn, "d1")
        await _add_beat(conn, "d1", 1, now)
        await _add_beat(conn, "d1", 2, now + timedelta(days=2))
        await _add_beat(conn, "d1", 3, now - timedelta(days=5))  # in the default partition
    finally:
        await conn.close()
    engine = create_engine(pg_url)
    try:
        later = now + timedelta(days=3)
        result = await maintain_heartbeats(engine, now=later, retention_days=2)
        again = await maintain_heartbeats(engine, now=later, retention_days=2)
    finally:
        await engine.dispose()
    partitions = await _partitions(pg_url)
    # Days ending before the cutoff (later - 2 days) are gone; the day holding it stays.
    assert partition_name(now.date()) in result.dropped
    assert partition_name(now.date()) not in partitions
    assert partition_name((now + timedelta(days=1)).date()) in partitions
    assert partition_name(later.date() + timedelta(days=PREMAKE_DAYS)) in result.created
    assert result.deleted == 1  # the old row in the default partition
    assert (again.created, again.dropped, again.deleted) == ([], [], 0)
    conn = await asyncpg.connect(_dsn(pg_url))
    try:
        assert [r["seq"] for r in await conn.fetch("SELECT seq FROM heartbeats")] == [2]
    finally:
        await conn.close()


async def test_retention_deletes_old_rows_on_sqlite_and_zero_keeps_everything(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    now = datetime.now(UTC)
    try:
        writer = BatchWriter(engine)
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO devices (id, key_type, public_key_pem, key_fingerprint, state, status, "
                    "tags, registered_at, updated_at, command_revision) VALUES ('d1', 'ed25519', 'pem', "
                    "'f', 'active', 'unknown', '[]', '2026-01-01 00:00:00.000000', "
                    "'2026-01-01 00:00:00.000000', 0)"
                )
            )
        await writer.write(
            [_beat("d1", 1, now - timedelta(hours=1)), _beat("d1", 2, now - timedelta(days=3))]
        )
        kept = await maintain_heartbeats(engine, now=now, retention_days=0)
        removed = await maintain_heartbeats(engine, now=now, retention_days=2)
        async with engine.connect() as conn:
            left = (await conn.execute(sa.text("SELECT seq FROM heartbeats"))).scalars().all()
    finally:
        await engine.dispose()
    assert kept.deleted == 0
    assert removed.deleted == 1
    assert left == [1]


def _beat(device_id: str, seq: int, ts: datetime) -> VerifiedHeartbeat:
    claims = parse_heartbeat(json.dumps(heartbeat_claims(device_id, seq, ts)).encode())
    return VerifiedHeartbeat(device_id, claims, ts)


async def test_a_seq_is_stored_once_even_with_another_ts_on_the_partitioned_table(pg_url: str) -> None:
    # The partition key is part of the primary key there, so the writer checks (device_id, seq).
    conn = await asyncpg.connect(_dsn(pg_url))
    try:
        await _add_device(conn, "d1")
    finally:
        await conn.close()
    engine = create_engine(pg_url)
    now = datetime.now(UTC)
    try:
        writer = BatchWriter(engine)
        first = await writer.write([_beat("d1", 7, now)])
        replay = await writer.write([_beat("d1", 7, now - timedelta(days=2)), _beat("d1", 8, now)])
    finally:
        await engine.dispose()
    assert (first.heartbeats.stored, first.heartbeats.duplicate) == (1, 0)
    assert (replay.heartbeats.stored, replay.heartbeats.duplicate) == (1, 1)


# --- query plans ------------------------------------------------------------------------------


async def _seed(url: str, now: datetime) -> None:
    conn = await asyncpg.connect(_dsn(url))
    try:
        # The past days' partitions, as a database that has run for a while has them.
        for days in range(1, 4):
            await conn.execute(create_partition_sql((now - timedelta(days=days)).date()))
        await conn.execute(
            "INSERT INTO devices (id, name, key_type, public_key_pem, key_fingerprint, state, status, tags, "
            "registered_at, updated_at, command_revision, bundle_version) "
            "SELECT 'dev-' || lpad(g::text, 6, '0'), 'device ' || g, 'ed25519', 'pem', md5(g::text), "
            "'active', (ARRAY['online','offline','unknown'])[1 + g % 3], '[]', "
            "$1::timestamptz - g * interval '1 minute', $1::timestamptz, 0, '1.' || (g % 5) "
            "FROM generate_series(1, $2) g",
            now,
            SEED_DEVICES,
        )
        await conn.execute(
            "INSERT INTO heartbeats (device_id, seq, ts, received_at, status, cpu_percent, memory_mb, "
            "disk_free_mb, uptime_s, agent_version) "
            "SELECT 'dev-' || lpad(d::text, 6, '0'), s, $1::timestamptz - s * interval '3 hours', "
            "$1::timestamptz - s * interval '3 hours', 'ok', 1, 1, 1, 1, 'x' "
            "FROM generate_series(1, $2) d, generate_series(1, $3) s",
            now,
            SEED_DEVICES,
            SEED_BEATS_PER_DEVICE,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


@contextmanager
def _captured(engine: AsyncEngine) -> Iterator[list[tuple[str, Any]]]:
    """The statements (and parameters) the engine sends while the block runs."""
    statements: list[tuple[str, Any]] = []

    def record(_conn: object, _cursor: object, statement: str, parameters: Any, *_args: object) -> None:
        statements.append((statement, parameters))

    sa.event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", record)


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


async def _explain(url: str, statements: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Every plan node of every statement (EXPLAIN without ANALYZE: the planner's choice)."""
    conn = await asyncpg.connect(_dsn(url))
    nodes: list[dict[str, Any]] = []
    try:
        for statement, parameters in statements:
            raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *(parameters or ()))
            nodes += _nodes(json.loads(raw)[0]["Plan"])
    finally:
        await conn.close()
    return nodes


def _heartbeat_relations(nodes: list[dict[str, Any]], kind: str | None = None) -> set[str]:
    """The heartbeats tables (parent or partitions) the plan reads, by a node kind if given."""
    return {
        n["Relation Name"]
        for n in nodes
        if n.get("Relation Name", "").startswith("heartbeats") and kind in {None, n["Node Type"]}
    }


def _scans(nodes: list[dict[str, Any]], kind: str) -> set[str]:
    return {n["Relation Name"] for n in nodes if n["Node Type"] == kind and "Relation Name" in n}


async def _populated(url: str) -> set[str]:
    conn = await asyncpg.connect(_dsn(url))
    try:
        rows = await conn.fetch("SELECT DISTINCT tableoid::regclass::text AS name FROM heartbeats")
    finally:
        await conn.close()
    return {r["name"] for r in rows}


@pytest.fixture
async def seeded(pg_url: str) -> tuple[str, datetime]:
    now = datetime.now(UTC)
    await _seed(pg_url, now)
    return pg_url, now


async def _plans(url: str, call: Any) -> list[dict[str, Any]]:
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as session:
            with _captured(engine) as statements:
                await call(session)
    finally:
        await engine.dispose()
    return await _explain(url, statements)


async def test_device_list_page_reads_the_registration_index(seeded: tuple[str, datetime]) -> None:
    url, _ = seeded

    async def page(session: Any) -> None:
        await service.list_devices(session, status=None, state=None, search=None, limit=50, offset=100)

    nodes = await _plans(url, page)
    index_scans = {n.get("Index Name") for n in nodes if n["Node Type"] in {"Index Scan", "Index Only Scan"}}
    assert "ix_devices_registered_at_id" in index_scans
    assert not any(n["Node Type"] == "Sort" for n in nodes), "the page must not sort the whole fleet"


async def test_device_detail_is_a_primary_key_lookup(seeded: tuple[str, datetime]) -> None:
    url, _ = seeded

    async def detail(session: Any) -> None:
        await service.get_device(session, "dev-000042")

    nodes = await _plans(url, detail)
    assert "devices" in _scans(nodes, "Index Scan")
    assert "devices" not in _scans(nodes, "Seq Scan")


async def test_heartbeat_history_uses_the_index_and_prunes_partitions(seeded: tuple[str, datetime]) -> None:
    url, now = seeded

    async def history(session: Any) -> None:
        await service.heartbeats(session, "dev-000042", since=None, until=None, limit=100)

    async def recent(session: Any) -> None:
        await service.heartbeats(session, "dev-000042", since=now - timedelta(hours=2), until=None, limit=100)

    full = await _plans(url, history)
    heartbeat_relations = {
        n["Relation Name"] for n in full if n.get("Relation Name", "").startswith("heartbeats")
    }
    assert heartbeat_relations, "the history reads heartbeats"
    populated = await _populated(url)
    # Empty partitions (the days ahead) are scanned in no time; the ones holding rows use the index.
    assert not _heartbeat_relations(full, "Seq Scan") & populated
    bounded = await _plans(url, recent)
    read = _heartbeat_relations(bounded)
    older = partition_name((now - timedelta(days=2)).date())
    assert older in heartbeat_relations
    assert older not in read, f"partitions before `since` are pruned, read: {sorted(read)}"
    assert not _heartbeat_relations(bounded, "Seq Scan") & populated


async def test_fleet_stats_never_read_heartbeats(seeded: tuple[str, datetime]) -> None:
    url, _ = seeded

    async def stats(session: Any) -> None:
        await service.stats(session)

    nodes = await _plans(url, stats)
    assert nodes
    assert not any(n.get("Relation Name", "").startswith("heartbeats") for n in nodes)
