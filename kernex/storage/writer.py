"""Writes a batch of verified messages in one transaction and returns only after it commits.

Heartbeats and events are stored once per (device_id, seq): PostgreSQL copies them into a
session temp table (COPY, the fastest way in) and moves them with `INSERT ... SELECT ... ON
CONFLICT DO NOTHING`; SQLite runs the same `INSERT ... ON CONFLICT DO NOTHING` per row. Rows of a
device deleted since verification are skipped, not failed: one deleted device must not turn
its batch into a poison batch that is retried forever.

Each device's latest state comes from its highest-seq heartbeat and only replaces a lower
stored seq; online/offline follows the newest timestamp, never arrival order (DESIGN.md
"Delivery guarantees"), so batches from several workers may commit in any order.

Events that report on commands are applied in the same transaction as their insert:
`deployment` progress updates the deployment's target, history and aggregate status
(kernex.storage.deployments), `config_applied` the device's applied configuration version
(kernex.storage.configs). Both are idempotent and ordered by seq, so a redelivered or late event
changes nothing it should not. An event whose data does not match its type's schema is stored
but applies nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kernex.kit.logs import get_logger
from kernex.protocol.commands import ConfigApplied, DeploymentProgress, EventType
from kernex.protocol.fleet import FleetMessage
from kernex.storage.configs import ConfigReport, apply_config_report
from kernex.storage.database import is_sqlite
from kernex.storage.deployments import Report, apply_report, recompute
from kernex.storage.exceptions import WriteError
from kernex.storage.fleet import normalize
from kernex.storage.models import ConnectionState, Device, DeviceStatusChange
from kernex.storage.records import Verified, VerifiedEvent, VerifiedHeartbeat, VerifiedStatus
from kernex.storage.types import JSONType, UTCDateTime
from kernex.storage.webhooks import enqueue

HEARTBEAT_COLUMNS = (
    "device_id",
    "seq",
    "ts",
    "received_at",
    "status",
    "cpu_percent",
    "memory_mb",
    "disk_free_mb",
    "uptime_s",
    "bundle_id",
    "bundle_version",
    "config_version",
    "agent_version",
)
EVENT_COLUMNS = ("device_id", "seq", "ts", "received_at", "type", "data")
# The devices columns a batch may change; read under a row lock, written back in one statement.
STATE_COLUMNS = (
    "status",
    "status_changed_at",
    "last_seen_at",
    "last_seq",
    "last_heartbeat_at",
    "health",
    "cpu_percent",
    "memory_mb",
    "disk_free_mb",
    "uptime_s",
    "bundle_id",
    "bundle_version",
    "config_version",
    "agent_version",
)
R = TypeVar("R", VerifiedHeartbeat, VerifiedEvent)
_TIME_COLUMNS = frozenset({"ts", "received_at"})
REASON_HEARTBEAT = "heartbeat"
REASON_STATUS = "status message"
FIRST_SEQ = 1  # a device's first heartbeat (kernex.agent.sequence, and any agent in the guide)

log = get_logger(__name__)

_DEVICES: sa.Table = Device.__table__  # type: ignore[attr-defined]  # SQLModel sets it at class creation
_STATUS_CHANGES: sa.Table = DeviceStatusChange.__table__  # type: ignore[attr-defined]  # as above


@dataclass(slots=True)
class Tally:
    """What happened to one channel's rows of a batch."""

    stored: int = 0
    duplicate: int = 0  # (device_id, seq) already stored, or twice in the batch
    vanished: int = 0  # the device was deleted between verification and commit


@dataclass(frozen=True, slots=True)
class StatusChange:
    """A device's connection state changed (and was recorded in device_status_changes)."""

    device_id: str
    status: str
    at: datetime
    reason: str


@dataclass(slots=True)
class WriteResult:
    """The outcome of one committed batch."""

    heartbeats: Tally = field(default_factory=Tally)
    events: Tally = field(default_factory=Tally)
    statuses: Tally = field(default_factory=Tally)
    status_changes: int = 0
    # Events that changed a deployment target or a device's applied configuration.
    reports_applied: int = 0
    # The devices that existed at commit (the others' rows vanished), and the status changes
    # recorded: what ingest republishes to integrators (kernex.protocol.fleet).
    present: frozenset[str] = frozenset()
    changes: list[StatusChange] = field(default_factory=list)
    # The batch as integrators see it (kernex.storage.fleet), and the webhook deliveries queued.
    fleet: list[FleetMessage] = field(default_factory=list)
    webhook_deliveries: int = 0
    # Heartbeat sequence continuity (see seq_continuity): seqs skipped when a device's latest
    # seq advanced, and heartbeats stored below it afterwards (late, filling such a gap).
    # gaps minus late is what is missing right now: lost, or still on its way.
    seq_gaps: int = 0
    seq_late: int = 0


@dataclass(slots=True)
class _Observation:
    """A statement about a device's connection at a time: a status message or a heartbeat."""

    ts: datetime
    status: ConnectionState
    reason: str


class BatchWriter:
    """Persists verified messages; one instance per engine, safe to reuse across batches."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sqlite = is_sqlite(str(engine.url))

    async def write(self, records: Sequence[Verified]) -> WriteResult:
        """Store the batch in one transaction; raises WriteError if it did not commit."""
        result = WriteResult()
        heartbeats = _unique(r for r in records if isinstance(r, VerifiedHeartbeat))
        events = _unique(r for r in records if isinstance(r, VerifiedEvent))
        statuses = [r for r in records if isinstance(r, VerifiedStatus)]
        result.heartbeats.duplicate = sum(isinstance(r, VerifiedHeartbeat) for r in records) - len(heartbeats)
        result.events.duplicate = sum(isinstance(r, VerifiedEvent) for r in records) - len(events)
        device_ids = sorted({r.device_id for r in records})
        if not device_ids:
            return result
        try:
            async with self._engine.begin() as conn:
                if self._sqlite:
                    # The first statement of an SQLite transaction should write: it takes the
                    # write lock then (waiting busy_timeout), instead of failing to upgrade a
                    # read snapshot that another writer made stale.
                    hb_new, ev_new = await self._insert_sqlite(conn, heartbeats, events)
                    current = await _lock_devices(conn, device_ids)
                else:
                    # Lock the device rows first, in id order, so workers writing the same
                    # devices queue up instead of deadlocking. This also opens the transaction
                    # that the raw asyncpg calls below then join.
                    current = await _lock_devices(conn, device_ids)
                    hb_new, ev_new = await self._insert_postgres(conn, heartbeats, events)
                changes = await _update_state(conn, current, heartbeats, events, statuses)
                # After the state update, which writes back the device columns it read.
                applied = await _apply_reports(conn, [e for e in events if e.device_id in current])
                recorded = [StatusChange(c["device_id"], c["status"], c["at"], c["reason"]) for c in changes]
                fleet = normalize(records, frozenset(current), recorded)
                # The outbox rows commit with the data they report, or not at all.
                deliveries = await enqueue(conn, fleet)
        except (OSError, sa.exc.SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise WriteError(f"batch of {len(records)} not committed: {type(exc).__name__}: {exc}") from exc
        for tally, rows, stored in ((result.heartbeats, heartbeats, hb_new), (result.events, events, ev_new)):
            vanished = sum(r.device_id not in current for r in rows)
            tally.stored = stored
            tally.vanished = vanished
            tally.duplicate += len(rows) - stored - vanished
        result.statuses.vanished = sum(r.device_id not in current for r in statuses)
        result.statuses.stored = len(statuses) - result.statuses.vanished
        result.status_changes = len(changes)
        result.changes = recorded
        result.present = frozenset(current)
        result.fleet = fleet
        result.webhook_deliveries = deliveries
        result.reports_applied = applied
        ahead, result.seq_gaps = seq_continuity(current, heartbeats)
        result.seq_late = hb_new - ahead
        return result

    async def _insert_postgres(
        self, conn: AsyncConnection, heartbeats: list[VerifiedHeartbeat], events: list[VerifiedEvent]
    ) -> tuple[int, int]:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        if not isinstance(driver, asyncpg.Connection) or not driver.is_in_transaction():
            # COPY outside the batch's transaction would commit rows before the batch does.
            raise WriteError("the asyncpg connection is not inside the batch transaction")
        hb_new = await _copy_insert(driver, "heartbeats", HEARTBEAT_COLUMNS, map(_heartbeat_row, heartbeats))
        ev_new = await _copy_insert(driver, "device_events", EVENT_COLUMNS, map(_event_row_pg, events))
        return hb_new, ev_new

    async def _insert_sqlite(
        self, conn: AsyncConnection, heartbeats: list[VerifiedHeartbeat], events: list[VerifiedEvent]
    ) -> tuple[int, int]:
        hb_new = await _executemany_insert(
            conn,
            "heartbeats",
            HEARTBEAT_COLUMNS,
            [dict(zip(HEARTBEAT_COLUMNS, _heartbeat_row(h), strict=True)) for h in heartbeats],
        )
        ev_new = await _executemany_insert(
            conn,
            "device_events",
            EVENT_COLUMNS,
            [dict(zip(EVENT_COLUMNS, _event_row(e), strict=True)) for e in events],
        )
        return hb_new, ev_new


async def _apply_reports(conn: AsyncConnection, events: list[VerifiedEvent]) -> int:
    """Apply deployment progress and config-applied events, in seq order; returns how many changed state."""
    applied = 0
    touched: set[str] = set()
    now = datetime.now(UTC)
    for event in sorted(events, key=lambda e: (e.device_id, e.claims.seq)):
        claims = event.claims
        try:
            if claims.type == EventType.DEPLOYMENT:
                progress = DeploymentProgress.model_validate(claims.data)
                report = Report(
                    event.device_id, claims.seq, _utc(claims.ts), _utc(event.received_at), progress
                )
                deployment_id = await apply_report(conn, report)
                if deployment_id is not None:
                    touched.add(deployment_id)
                    applied += 1
            elif claims.type == EventType.CONFIG_APPLIED:
                config = ConfigApplied.model_validate(claims.data)
                config_report = ConfigReport(event.device_id, claims.seq, _utc(claims.ts), config)
                applied += await apply_config_report(conn, config_report)
        except ValidationError as exc:
            # Stored as it came (the device signed it), but it cannot be acted on.
            log.warning(
                "event data does not match its type",
                device_id=event.device_id,
                seq=claims.seq,
                type=claims.type,
                error=str(exc.errors()[0]["msg"]),
            )
    await recompute(conn, touched, now)
    return applied


def seq_continuity(
    current: dict[str, dict[str, Any]], heartbeats: list[VerifiedHeartbeat]
) -> tuple[int, int]:
    """(heartbeats above their device's stored last_seq, seqs skipped below the new last_seq).

    `current` is the devices' state read under the row lock, before this batch. last_seq only
    moves in the same transaction as the inserts, so a heartbeat above it cannot be stored yet:
    all of those are new, and whatever else the batch stored lies below it (late). A device
    with no heartbeat yet counts from FIRST_SEQ - 1, since every agent starts at 1.
    """
    above: dict[str, set[int]] = {}
    for h in heartbeats:
        state = current.get(h.device_id)
        if state is None:
            continue  # the device vanished: nothing of it was stored
        if h.claims.seq > (state["last_seq"] or FIRST_SEQ - 1):
            above.setdefault(h.device_id, set()).add(h.claims.seq)
    ahead = sum(len(seqs) for seqs in above.values())
    skipped = 0
    for device_id, seqs in above.items():
        last = current[device_id]["last_seq"] or FIRST_SEQ - 1
        skipped += max(seqs) - last - len(seqs)
    return ahead, skipped


def _unique(records: Iterable[R]) -> list[R]:
    """The first record of each (device_id, seq): a redelivery may land in the same batch."""
    seen: dict[tuple[str, int], R] = {}
    for record in records:
        seen.setdefault((record.device_id, record.claims.seq), record)
    return list(seen.values())


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _heartbeat_row(h: VerifiedHeartbeat) -> tuple[Any, ...]:
    c = h.claims
    return (
        h.device_id,
        c.seq,
        _utc(c.ts),
        _utc(h.received_at),
        c.status,
        c.metrics.cpu_percent,
        c.metrics.memory_mb,
        c.metrics.disk_free_mb,
        c.metrics.uptime_s,
        c.bundle.id if c.bundle else None,
        c.bundle.version if c.bundle else None,
        c.config_version,
        c.agent_version,
    )


def _event_row(e: VerifiedEvent) -> tuple[Any, ...]:
    c = e.claims
    return (e.device_id, c.seq, _utc(c.ts), _utc(e.received_at), c.type, c.data)


def _event_row_pg(e: VerifiedEvent) -> tuple[Any, ...]:
    # asyncpg's COPY encodes jsonb from its text form.
    *head, data = _event_row(e)
    return (*head, json.dumps(data, ensure_ascii=False, separators=(",", ":")))


async def _copy_insert(
    driver: asyncpg.Connection, table: str, columns: tuple[str, ...], rows: Iterable[tuple[Any, ...]]
) -> int:
    records = list(rows)
    if not records:
        return 0
    stage = f"kernex_ingest_{table}"
    cols = ", ".join(columns)
    # A session temp table, emptied at each commit: created once per pooled connection.
    await driver.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table}) ON COMMIT DELETE ROWS")
    await driver.copy_records_to_table(stage, records=records, columns=list(columns))
    # heartbeats is partitioned by ts (kernex.storage.partitions): its unique key is (device_id,
    # seq, ts), so a row sharing (device_id, seq) but not ts is refused by NOT EXISTS. That check
    # is race-free because every batch holds its devices' row locks (_lock_devices) by now.
    status = await driver.execute(
        f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {stage} s "  # noqa: S608 - identifiers are module constants
        "WHERE EXISTS (SELECT 1 FROM devices d WHERE d.id = s.device_id) "
        f"AND NOT EXISTS (SELECT 1 FROM {table} t WHERE t.device_id = s.device_id AND t.seq = s.seq) "
        "ON CONFLICT DO NOTHING"
    )
    # The command tag is "INSERT 0 <rows>".
    return int(str(status).rsplit(" ", 1)[-1])


async def _executemany_insert(
    conn: AsyncConnection, table: str, columns: tuple[str, ...], rows: list[dict[str, Any]]
) -> int:
    if not rows:
        return 0
    binds = [
        sa.bindparam(c, type_=UTCDateTime()) if c in _TIME_COLUMNS else sa.bindparam(c, type_=JSONType)
        for c in columns
        if c in _TIME_COLUMNS or c == "data"
    ]
    statement = sa.text(
        f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608 - identifiers are module constants
        f"SELECT {', '.join(':' + c for c in columns)} "
        "WHERE EXISTS (SELECT 1 FROM devices WHERE id = :device_id) "
        "ON CONFLICT (device_id, seq) DO NOTHING"
    ).bindparams(*binds)
    result = await conn.execute(statement, rows)
    # sqlite3 sums the rows changed over an executemany; skipped rows count zero.
    return max(result.rowcount, 0)


async def _lock_devices(conn: AsyncConnection, device_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The devices' current state, each row locked until commit (SQLite locks the whole file)."""
    query = (
        sa.select(_DEVICES.c.id, *(_DEVICES.c[c] for c in STATE_COLUMNS))
        .where(_DEVICES.c.id.in_(device_ids))
        .order_by(_DEVICES.c.id)
        # FOR NO KEY UPDATE: enough to serialise state updates, and it does not conflict with
        # the key-share locks that the heartbeats' foreign key checks take.
        .with_for_update(key_share=True)
    )
    rows = await conn.execute(query)
    return {row.id: {c: getattr(row, c) for c in STATE_COLUMNS} for row in rows}


def _latest_by_device(records: Iterable[R]) -> dict[str, R]:
    latest: dict[str, R] = {}
    for record in records:
        best = latest.get(record.device_id)
        if best is None or record.claims.seq > best.claims.seq:
            latest[record.device_id] = record
    return latest


async def _update_state(
    conn: AsyncConnection,
    current: dict[str, dict[str, Any]],
    heartbeats: list[VerifiedHeartbeat],
    events: list[VerifiedEvent],
    statuses: list[VerifiedStatus],
) -> list[dict[str, Any]]:
    """Apply the batch to each device's latest state; returns the status changes recorded."""
    latest = _latest_by_device(heartbeats)
    seen: dict[str, datetime] = {}
    received: list[tuple[str, datetime]] = [(r.device_id, r.received_at) for r in heartbeats]
    received += [(r.device_id, r.received_at) for r in events]
    for device_id, at in received:
        seen[device_id] = max(_utc(at), seen.get(device_id, _utc(at)))
    observations = _observations(heartbeats, statuses)
    updates: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []
    for device_id, old in current.items():
        new = dict(old)
        h = latest.get(device_id)
        if h is not None and (old["last_seq"] is None or h.claims.seq > old["last_seq"]):
            new.update(_latest_fields(h))
        if device_id in seen and (old["last_seen_at"] is None or seen[device_id] > old["last_seen_at"]):
            new["last_seen_at"] = seen[device_id]
        for obs in sorted(observations.get(device_id, []), key=lambda o: o.ts):
            changed_at = new["status_changed_at"]
            if (changed_at is None or obs.ts > changed_at) and new["status"] != obs.status.value:
                new["status"], new["status_changed_at"] = obs.status.value, obs.ts
                changes.append(
                    {"device_id": device_id, "status": obs.status.value, "at": obs.ts, "reason": obs.reason}
                )
        if new != old:
            updates.append({"b_id": device_id, **{f"b_{k}": v for k, v in new.items()}})
    if updates:
        statement = (
            sa.update(_DEVICES)
            .where(_DEVICES.c.id == sa.bindparam("b_id"))
            .values({c: sa.bindparam(f"b_{c}") for c in STATE_COLUMNS})
        )
        await conn.execute(statement, updates)
    if changes:
        await conn.execute(sa.insert(_STATUS_CHANGES), changes)
    return changes


def _observations(
    heartbeats: list[VerifiedHeartbeat], statuses: list[VerifiedStatus]
) -> dict[str, list[_Observation]]:
    """Per device, what the batch says about its connection and when."""
    observations: dict[str, list[_Observation]] = {}
    for s in statuses:
        observations.setdefault(s.device_id, []).append(
            _Observation(_utc(s.ts), ConnectionState(s.status.value), REASON_STATUS)
        )
    newest: dict[str, datetime] = {}
    for h in heartbeats:
        ts = _utc(h.claims.ts)
        newest[h.device_id] = max(ts, newest.get(h.device_id, ts))
    for device_id, ts in newest.items():
        # A heartbeat means the device was online when it sent it; the newest one stands for all.
        observations.setdefault(device_id, []).append(
            _Observation(ts, ConnectionState.ONLINE, REASON_HEARTBEAT)
        )
    return observations


def _latest_fields(h: VerifiedHeartbeat) -> dict[str, Any]:
    c = h.claims
    return {
        "last_seq": c.seq,
        "last_heartbeat_at": _utc(c.ts),
        "health": c.status,
        "cpu_percent": c.metrics.cpu_percent,
        "memory_mb": c.metrics.memory_mb,
        "disk_free_mb": c.metrics.disk_free_mb,
        "uptime_s": c.metrics.uptime_s,
        "bundle_id": c.bundle.id if c.bundle else None,
        "bundle_version": c.bundle.version if c.bundle else None,
        "config_version": c.config_version,
        "agent_version": c.agent_version,
    }
