"""Time-based transitions: targets that ran out of time fail, silent devices go offline.

Every change is a conditional UPDATE (it applies only if the row is still in the state the
sweep saw), so several API processes may sweep at once: each row changes once, and only the
process whose UPDATE changed it records the consequences (history, status change, aggregate).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.protocol.messages import ConnectionStatus
from kernex.storage.deployments import (
    EXPIRED_ERROR,
    IN_PROGRESS_STATUSES,
    TIMEOUT_ERROR,
    TargetStatus,
    recompute,
    record_history,
)
from kernex.storage.models import (
    Bundle,
    Deployment,
    DeploymentTarget,
    Device,
    DeviceCommand,
    DeviceStatusChange,
    Rollout,
)

OFFLINE_REASON = "missed heartbeats"

_TARGETS: sa.Table = DeploymentTarget.__table__  # type: ignore[attr-defined]  # SQLModel sets it at class creation
_DEPLOYMENTS: sa.Table = Deployment.__table__  # type: ignore[attr-defined]  # as above
_BUNDLES: sa.Table = Bundle.__table__  # type: ignore[attr-defined]  # as above
_COMMANDS: sa.Table = DeviceCommand.__table__  # type: ignore[attr-defined]  # as above
_DEVICES: sa.Table = Device.__table__  # type: ignore[attr-defined]  # as above
_STATUS_CHANGES: sa.Table = DeviceStatusChange.__table__  # type: ignore[attr-defined]  # as above
_ROLLOUTS: sa.Table = Rollout.__table__  # type: ignore[attr-defined]  # as above


@dataclass(frozen=True, slots=True)
class _Overdue:
    deployment_id: str
    device_id: str
    status: str
    started_at: datetime | None
    bundle_id: str
    version: str
    error: str


async def fail_overdue_targets(engine: AsyncEngine, now: datetime) -> list[tuple[str, str]]:
    """Fail targets that did not finish within their deployment's timeout after the device took
    them up (error "timeout"), and pending targets whose command expired unread ("expired").

    A rollout's unread expired commands are not failures: the rollout queues those targets again
    (its commands expire when its maintenance window closes; kernex.api.rollouts.engine).
    """
    failed: list[tuple[str, str]] = []
    for overdue in await _overdue_targets(engine, now):
        async with engine.begin() as conn:
            # The first statement writes: on SQLite it takes the write lock before anything is read.
            changed = await conn.execute(
                sa.update(_TARGETS)
                .where(
                    _TARGETS.c.deployment_id == overdue.deployment_id,
                    _TARGETS.c.device_id == overdue.device_id,
                    _TARGETS.c.status == overdue.status,
                    _TARGETS.c.started_at.is_(None)
                    if overdue.started_at is None
                    else _TARGETS.c.started_at == overdue.started_at,
                )
                .values(
                    status=TargetStatus.FAILED.value, error=overdue.error, updated_at=now, finished_at=now
                )
            )
            if not changed.rowcount:
                continue  # a report or another sweeper got there first
            if overdue.started_at is not None:
                await record_history(
                    conn,
                    device_id=overdue.device_id,
                    deployment_id=overdue.deployment_id,
                    bundle_id=overdue.bundle_id,
                    version=overdue.version,
                    result=TargetStatus.FAILED.value,
                    started_at=overdue.started_at,
                    finished_at=now,
                )
            await recompute(conn, [overdue.deployment_id], now)
        failed.append((overdue.deployment_id, overdue.device_id))
    return failed


async def _overdue_targets(engine: AsyncEngine, now: datetime) -> list[_Overdue]:
    columns = (
        _TARGETS.c.deployment_id,
        _TARGETS.c.device_id,
        _TARGETS.c.status,
        _TARGETS.c.started_at,
        _DEPLOYMENTS.c.bundle_id,
        _BUNDLES.c.version,
    )
    joined = _TARGETS.join(_DEPLOYMENTS, _DEPLOYMENTS.c.id == _TARGETS.c.deployment_id).join(
        _BUNDLES, _BUNDLES.c.id == _DEPLOYMENTS.c.bundle_id
    )
    overdue: list[_Overdue] = []
    async with engine.connect() as conn:
        running = await conn.execute(
            sa.select(*columns, _DEPLOYMENTS.c.timeout_s)
            .select_from(joined)
            .where(_TARGETS.c.status.in_([s.value for s in IN_PROGRESS_STATUSES]))
        )
        overdue += [
            _Overdue(*row[:6], error=TIMEOUT_ERROR)
            for row in running
            if row.started_at is not None and row.started_at + timedelta(seconds=row.timeout_s) <= now
        ]
        unread = await conn.execute(
            sa.select(*columns)
            .select_from(joined.join(_COMMANDS, _COMMANDS.c.id == _TARGETS.c.command_id))
            .where(
                _TARGETS.c.status == TargetStatus.PENDING.value,
                _COMMANDS.c.expires_at <= now,
                ~sa.exists().where(_ROLLOUTS.c.deployment_id == _TARGETS.c.deployment_id),
            )
        )
        overdue += [_Overdue(*row, error=EXPIRED_ERROR) for row in unread]
    return overdue


async def mark_silent_devices_offline(
    engine: AsyncEngine, now: datetime, *, missed_heartbeats: int, default_interval_s: int
) -> list[str]:
    """Mark offline the online devices not heard from for `missed_heartbeats` of their intervals.

    A device's interval is the one its configuration sets, or the default. Each status change
    is recorded (reason "missed heartbeats"); a later heartbeat brings the device back online.
    """
    async with engine.connect() as conn:
        intervals = (
            await conn.execute(
                sa.select(_DEVICES.c.heartbeat_interval_s)
                .where(_DEVICES.c.status == ConnectionStatus.ONLINE.value)
                .distinct()
            )
        ).scalars()
        intervals_seen = list(intervals)
    offline: list[str] = []
    for interval in intervals_seen:
        cutoff = now - timedelta(seconds=missed_heartbeats * (interval or default_interval_s))
        # The rows are locked in id order, as ingest and command issuers lock them, and a row
        # locked by someone else is skipped: it is being written, most likely by a heartbeat.
        # A plain UPDATE locked them in scan order and deadlocked with ingest (benchmarks/fleet.py).
        silent = (
            sa.select(_DEVICES.c.id)
            .where(
                _DEVICES.c.status == ConnectionStatus.ONLINE.value,
                _DEVICES.c.heartbeat_interval_s.is_(None)
                if interval is None
                else _DEVICES.c.heartbeat_interval_s == interval,
                sa.or_(_DEVICES.c.last_seen_at.is_(None), _DEVICES.c.last_seen_at < cutoff),
                sa.or_(_DEVICES.c.status_changed_at.is_(None), _DEVICES.c.status_changed_at < cutoff),
            )
            .order_by(_DEVICES.c.id)
            .with_for_update(key_share=True, skip_locked=True)
        )
        async with engine.begin() as conn:
            rows = await conn.execute(
                sa.update(_DEVICES)
                .where(_DEVICES.c.id.in_(silent.scalar_subquery()))
                .values(status=ConnectionStatus.OFFLINE.value, status_changed_at=now)
                .returning(_DEVICES.c.id)
            )
            ids = list(rows.scalars())
            if ids:
                await conn.execute(
                    sa.insert(_STATUS_CHANGES),
                    [
                        {
                            "device_id": device_id,
                            "status": ConnectionStatus.OFFLINE.value,
                            "at": now,
                            "reason": OFFLINE_REASON,
                        }
                        for device_id in ids
                    ],
                )
        offline += ids
    return offline
