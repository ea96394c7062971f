"""Deployment state shared by the API and ingest: target statuses, the aggregate, device reports.

The API creates deployments and cancels them; ingest applies the progress devices report; the
sweeper fails targets that ran out of time. All of them change targets through these functions,
on an `AsyncConnection` inside the caller's transaction, so the rules live in one place:

- A target's status is `pending` until the device reports, then the stage it reported
  (kernex.protocol.commands.DeploymentStage), or `cancelled`/`superseded` by an operator. A
  rollout's target is `queued` before it: its phase selected the device, but its command waits
  for the rollout's rate limit or maintenance window.
- Reports are applied by `seq`, never by arrival: an older or repeated report changes nothing,
  and a terminal status is never replaced by a non-terminal stage. A terminal stage the device
  reports does replace a terminal status the server decided (timeout, cancelled, superseded):
  the device's account of what it actually did wins.
- The deployment's status follows from its targets' (`aggregate_status`), except that a
  rollout still running (or awaiting approval) keeps it in progress between phases.

Lock order, to keep concurrent writers from deadlocking: device rows (ingest), then target rows,
then deployment rows in id order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from kernex.protocol.commands import DeploymentProgress
from kernex.storage.models import (
    Bundle,
    Deployment,
    DeploymentTarget,
    Device,
    DeviceBundleHistory,
    Rollout,
)

TIMEOUT_ERROR = "timeout"  # the target's error when it did not finish within the deployment timeout
EXPIRED_ERROR = "expired"  # the target's error when its command expired before the device took it up

_TARGETS: sa.Table = DeploymentTarget.__table__  # type: ignore[attr-defined]  # SQLModel sets it at class creation
_DEPLOYMENTS: sa.Table = Deployment.__table__  # type: ignore[attr-defined]  # as above
_HISTORY: sa.Table = DeviceBundleHistory.__table__  # type: ignore[attr-defined]  # as above
_DEVICES: sa.Table = Device.__table__  # type: ignore[attr-defined]  # as above
_BUNDLES: sa.Table = Bundle.__table__  # type: ignore[attr-defined]  # as above
_ROLLOUTS: sa.Table = Rollout.__table__  # type: ignore[attr-defined]  # as above


class TargetStatus(StrEnum):
    """Where one device stands in a deployment."""

    QUEUED = "queued"
    PENDING = "pending"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    HEALTH_CHECKING = "health_checking"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    REFUSED = "refused"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"


class DeploymentStatus(StrEnum):
    """A deployment's aggregate status."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PARTIALLY_FAILED = "partially_failed"
    CANCELLED = "cancelled"


IN_PROGRESS_STATUSES = frozenset(
    {TargetStatus.DOWNLOADING, TargetStatus.VERIFYING, TargetStatus.INSTALLING, TargetStatus.HEALTH_CHECKING}
)
# A target in one of these keeps its device busy: a second deployment to it is refused (409).
ACTIVE_TARGET_STATUSES = IN_PROGRESS_STATUSES | {TargetStatus.PENDING, TargetStatus.QUEUED}
# Targets whose device has not taken the deployment up: cancelling or aborting ends them.
UNSTARTED_TARGET_STATUSES = frozenset({TargetStatus.QUEUED, TargetStatus.PENDING})
# What a device reports as the end of a deploy command.
DEVICE_TERMINAL_STATUSES = frozenset(
    {TargetStatus.SUCCEEDED, TargetStatus.FAILED, TargetStatus.ROLLED_BACK, TargetStatus.REFUSED}
)
TERMINAL_TARGET_STATUSES = DEVICE_TERMINAL_STATUSES | {TargetStatus.CANCELLED, TargetStatus.SUPERSEDED}
ACTIVE_DEPLOYMENT_STATUSES = frozenset({DeploymentStatus.PENDING, DeploymentStatus.IN_PROGRESS})


class RolloutState(StrEnum):
    """Where a phased rollout stands (kernex.api.rollouts)."""

    RUNNING = "running"
    AWAITING_APPROVAL = "awaiting_approval"
    COMPLETED = "completed"
    ABORTED = "aborted"
    CANCELLED = "cancelled"


# A rollout in one of these may still start phases: its deployment is not finished.
ACTIVE_ROLLOUT_STATES = frozenset({RolloutState.RUNNING, RolloutState.AWAITING_APPROVAL})


def aggregate_status(counts: Mapping[str, int], *, cancelled: bool) -> DeploymentStatus:
    """A deployment's status from how many of its targets are in each status.

    Cancelled by an operator: cancelled. Any target not finished: pending while none has
    started or finished on a device, in progress otherwise. All finished: succeeded or failed if all that
    ran agree, partially failed if they do not; superseded targets count as neither, so a
    deployment whose every target was superseded ends as cancelled.
    """
    if cancelled:
        return DeploymentStatus.CANCELLED
    if any(counts.get(s, 0) for s in ACTIVE_TARGET_STATUSES):
        started = any(counts.get(s, 0) for s in IN_PROGRESS_STATUSES | DEVICE_TERMINAL_STATUSES)
        return DeploymentStatus.IN_PROGRESS if started else DeploymentStatus.PENDING
    succeeded = counts.get(TargetStatus.SUCCEEDED, 0)
    unsuccessful = sum(
        n
        for s, n in counts.items()
        if s in TERMINAL_TARGET_STATUSES and s not in {TargetStatus.SUCCEEDED, TargetStatus.SUPERSEDED}
    )
    if succeeded and unsuccessful:
        return DeploymentStatus.PARTIALLY_FAILED
    if succeeded:
        return DeploymentStatus.SUCCEEDED
    if unsuccessful:
        return DeploymentStatus.FAILED
    return DeploymentStatus.CANCELLED


async def recompute(conn: AsyncConnection, deployment_ids: Iterable[str], now: datetime) -> None:
    """Bring each deployment's status (and finished_at) in line with its targets'."""
    for deployment_id in sorted(set(deployment_ids)):
        row = (
            await conn.execute(
                sa.select(_DEPLOYMENTS.c.status, _DEPLOYMENTS.c.cancelled_at, _DEPLOYMENTS.c.finished_at)
                .where(_DEPLOYMENTS.c.id == deployment_id)
                # FOR NO KEY UPDATE, not FOR UPDATE: the same transaction (and others) may
                # already hold a key-share lock on this row from inserting rows that refer to
                # it (device_bundle_history, rollout transitions). Two ingest workers each
                # holding one and each asking FOR UPDATE was a deadlock; this lock still
                # serialises recomputes but is compatible with those foreign-key checks.
                .with_for_update(key_share=True)
            )
        ).first()
        if row is None:
            continue
        rows = await conn.execute(
            sa.select(_TARGETS.c.status, sa.func.count())
            .where(_TARGETS.c.deployment_id == deployment_id)
            .group_by(_TARGETS.c.status)
        )
        counts: dict[str, int] = {str(status): int(n) for status, n in rows}
        status = aggregate_status(counts, cancelled=row.cancelled_at is not None)
        if status not in ACTIVE_DEPLOYMENT_STATUSES and await _rollout_active(conn, deployment_id):
            # Between phases every target may have finished; the phases to come have not.
            started = any(counts.get(s, 0) for s in IN_PROGRESS_STATUSES | DEVICE_TERMINAL_STATUSES)
            status = DeploymentStatus.IN_PROGRESS if started else DeploymentStatus.PENDING
        finished = status not in ACTIVE_DEPLOYMENT_STATUSES
        finished_at = (row.finished_at or now) if finished else None
        if status.value != row.status or finished_at != row.finished_at:
            await conn.execute(
                sa.update(_DEPLOYMENTS)
                .where(_DEPLOYMENTS.c.id == deployment_id)
                .values(status=status.value, finished_at=finished_at)
            )


async def _rollout_active(conn: AsyncConnection, deployment_id: str) -> bool:
    state = (
        await conn.execute(sa.select(_ROLLOUTS.c.state).where(_ROLLOUTS.c.deployment_id == deployment_id))
    ).scalar_one_or_none()
    return state in ACTIVE_ROLLOUT_STATES


@dataclass(frozen=True, slots=True)
class Report:
    """One device's deployment progress report, as ingest verified it."""

    device_id: str
    seq: int
    ts: datetime
    received_at: datetime
    progress: DeploymentProgress


async def apply_report(conn: AsyncConnection, report: Report) -> str | None:
    """Apply a progress report to its target; returns the deployment id if the target changed.

    A report for no known target (a deployment deleted since, a forged id) or for another
    bundle than the deployment's changes nothing. The caller recomputes the aggregates.
    """
    progress = report.progress
    target = (
        await conn.execute(
            sa.select(
                _TARGETS.c.status,
                _TARGETS.c.error,
                _TARGETS.c.started_at,
                _TARGETS.c.last_seq,
                _DEPLOYMENTS.c.bundle_id,
                _BUNDLES.c.version,
            )
            .join(_DEPLOYMENTS, _DEPLOYMENTS.c.id == _TARGETS.c.deployment_id)
            .join(_BUNDLES, _BUNDLES.c.id == _DEPLOYMENTS.c.bundle_id)
            .where(
                _TARGETS.c.deployment_id == progress.deployment_id,
                _TARGETS.c.device_id == report.device_id,
            )
            .with_for_update(of=_TARGETS)
        )
    ).first()
    if target is None or target.bundle_id != progress.bundle_id:
        return None
    stage = TargetStatus(progress.stage.value)
    current = TargetStatus(target.status)
    if target.last_seq is not None and report.seq <= target.last_seq:
        return None  # a repeat, or older than what was applied
    if current in TERMINAL_TARGET_STATUSES and stage not in DEVICE_TERMINAL_STATUSES:
        return None  # finished; a late progress report does not reopen it
    # The device's clock may run a little ahead; it cannot have started after the platform heard.
    at = min(report.ts, report.received_at)
    started_at = target.started_at or at
    terminal = stage in DEVICE_TERMINAL_STATUSES
    await conn.execute(
        sa.update(_TARGETS)
        .where(
            _TARGETS.c.deployment_id == progress.deployment_id,
            _TARGETS.c.device_id == report.device_id,
        )
        .values(
            status=stage.value,
            last_seq=report.seq,
            started_at=started_at,
            updated_at=report.received_at,
            finished_at=at if terminal else None,
            error=progress.error if stage is not TargetStatus.SUCCEEDED else None,
        )
    )
    if terminal:
        await record_history(
            conn,
            device_id=report.device_id,
            deployment_id=progress.deployment_id,
            bundle_id=target.bundle_id,
            version=target.version,
            result=stage.value,
            started_at=started_at,
            finished_at=at,
        )
    if stage is TargetStatus.SUCCEEDED:
        # The device now runs the bundle, unless a newer heartbeat already said otherwise.
        await conn.execute(
            sa.update(_DEVICES)
            .where(
                _DEVICES.c.id == report.device_id,
                sa.or_(_DEVICES.c.last_seq.is_(None), _DEVICES.c.last_seq < report.seq),
            )
            .values(bundle_id=target.bundle_id, bundle_version=target.version)
        )
    return progress.deployment_id


async def record_history(
    conn: AsyncConnection,
    *,
    device_id: str,
    deployment_id: str,
    bundle_id: str,
    version: str,
    result: str,
    started_at: datetime,
    finished_at: datetime,
) -> None:
    """The device's history row for this deployment, created or updated with the outcome."""
    existing = (
        await conn.execute(
            sa.select(_HISTORY.c.id)
            .where(_HISTORY.c.device_id == device_id, _HISTORY.c.deployment_id == deployment_id)
            .limit(1)
        )
    ).scalar_one_or_none()
    values: dict[str, Any] = {"result": result, "started_at": started_at, "finished_at": finished_at}
    if existing is None:
        await conn.execute(
            sa.insert(_HISTORY).values(
                device_id=device_id,
                deployment_id=deployment_id,
                bundle_id=bundle_id,
                version=version,
                **values,
            )
        )
    else:
        await conn.execute(sa.update(_HISTORY).where(_HISTORY.c.id == existing).values(**values))
