"""Rollouts seen from the API: start one, approve the next phase, cancel, show it, dry-run it.

The phases themselves are started by the engine (kernex.api.rollouts.engine). Every transition is
a RolloutTransition row, and audited. Raises domain errors, knows nothing of HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from fastapi import Request
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.audit import service as audit
from kernex.api.auth.schemas import Principal
from kernex.api.errors import ConflictError, NotFoundError
from kernex.api.groups import service as groups
from kernex.api.rollouts import plan
from kernex.api.rollouts.schemas import (
    Phase,
    PhaseOut,
    PhasePreview,
    RolloutDetail,
    RolloutOut,
    RolloutPreview,
    RolloutStrategy,
    TransitionOut,
)
from kernex.storage.deployments import (
    ACTIVE_ROLLOUT_STATES,
    ACTIVE_TARGET_STATUSES,
    RolloutState,
    TargetStatus,
)
from kernex.storage.models import DeploymentTarget, Rollout, RolloutTransition

AUDIT_PREFIX = "rollout."  # transitions are audited as rollout.<event>
QUEUED_AUDITS = "kernex.rollout_audits"  # the session.info key of audit entries waiting for the commit


def transition(
    session: AsyncSession,
    deployment_id: str,
    *,
    event: str,
    state: RolloutState,
    phase: int | None,
    actor: str,
    reason: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Add a transition to the session, and queue its audit entry for `audit_queued`.

    The audit entry waits for the caller's commit: writing it commits, and a rollout step must
    hold its rollout's row until all of its work is done.
    """
    session.add(
        RolloutTransition(
            deployment_id=deployment_id,
            at=datetime.now(UTC),
            event=event,
            state=state.value,
            phase=phase,
            actor=actor,
            reason=reason,
            details=dict(details or {}),
        )
    )
    session.info.setdefault(QUEUED_AUDITS, []).append(
        {
            "actor": actor,
            "action": AUDIT_PREFIX + event,
            "target": f"deployment:{deployment_id}",
            "details": {"state": state.value, "phase": phase, "reason": reason, **(details or {})},
        }
    )


async def audit_queued(session: AsyncSession, *, request: Request | None = None) -> None:
    """Audit the transitions queued in the session (each entry commits)."""
    for entry in session.info.pop(QUEUED_AUDITS, []):
        await audit.record(session, outcome="success", request=request, **entry)


async def start(
    session: AsyncSession,
    deployment_id: str,
    strategy: RolloutStrategy,
    selector: Mapping[str, Any],
    *,
    actor: str,
) -> Rollout:
    """Add a running rollout, at its first phase (not started yet), to the session."""
    now = datetime.now(UTC)
    rollout = Rollout(
        deployment_id=deployment_id,
        strategy=strategy.model_dump(mode="json"),
        selector=dict(selector),
        state=RolloutState.RUNNING.value,
        phase=0,
        updated_at=now,
    )
    session.add(rollout)
    session.add(
        RolloutTransition(
            deployment_id=deployment_id,
            at=now,
            event="created",
            state=RolloutState.RUNNING.value,
            phase=None,
            actor=actor,
            details={"phases": len(strategy.phases), "selector": dict(selector)},
        )
    )
    return rollout


async def approve(
    session: AsyncSession, deployment_id: str, *, actor: Principal, request: Request | None = None
) -> None:
    """Let a rollout awaiting approval go on to its next phase (the engine starts it)."""
    target = f"deployment:{deployment_id}"
    async with audit.audited(session, actor=actor, action="rollout.approved", target=target, request=request):
        changed = await session.exec(
            sa.update(Rollout)
            .where(
                col(Rollout.deployment_id) == deployment_id,
                col(Rollout.state) == RolloutState.AWAITING_APPROVAL.value,
            )
            .values(
                state=RolloutState.RUNNING.value,
                phase=col(Rollout.phase) + 1,
                phase_started_at=None,
                phase_passed_at=None,
                updated_at=datetime.now(UTC),
            )
        )
        rollout = await get_rollout(session, deployment_id)
        if not changed.rowcount:
            raise ConflictError(f"rollout {deployment_id} is {rollout.state}: nothing awaits approval")
        transition(
            session,
            deployment_id,
            event="approved",
            state=RolloutState.RUNNING,
            phase=rollout.phase,
            actor=actor.actor,
        )
        await audit_queued(session, request=request)


async def stop_for_cancel(session: AsyncSession, deployment_id: str, *, actor: str) -> None:
    """Mark the deployment's rollout (if it is one, still going) cancelled, in the caller's transaction."""
    changed = await session.exec(
        sa.update(Rollout)
        .where(
            col(Rollout.deployment_id) == deployment_id,
            col(Rollout.state).in_([s.value for s in ACTIVE_ROLLOUT_STATES]),
        )
        .values(
            state=RolloutState.CANCELLED.value,
            stop_reason=f"cancelled by {actor}",
            stopped_at=datetime.now(UTC),
            updated_at=datetime.now(UTC),
        )
    )
    if changed.rowcount:
        session.add(
            RolloutTransition(
                deployment_id=deployment_id,
                at=datetime.now(UTC),
                event="cancelled",
                state=RolloutState.CANCELLED.value,
                actor=actor,
                reason=f"cancelled by {actor}",
            )
        )


async def get_rollout(session: AsyncSession, deployment_id: str) -> Rollout:
    """The deployment's rollout, or NotFoundError (no such deployment, or not a rollout)."""
    rollout = await session.get(Rollout, deployment_id, populate_existing=True)
    if rollout is None:
        raise NotFoundError(f"deployment {deployment_id} is not a rollout (or does not exist)")
    return rollout


def _out(rollout: Rollout) -> RolloutOut:
    strategy = RolloutStrategy.model_validate(rollout.strategy)
    return RolloutOut(
        state=RolloutState(rollout.state),
        phase=rollout.phase,
        phases_total=len(strategy.phases),
        phase_started_at=rollout.phase_started_at,
        phase_passed_at=rollout.phase_passed_at,
        stop_reason=rollout.stop_reason,
        stopped_at=rollout.stopped_at,
        selector=rollout.selector,
        strategy=strategy,
    )


async def summary(session: AsyncSession, deployment_id: str) -> RolloutOut | None:
    """The rollout's state, phase and stop reason; None for a deployment that is not a rollout."""
    rollout = await session.get(Rollout, deployment_id, populate_existing=True)
    return _out(rollout) if rollout is not None else None


def _phase_state(rollout: Rollout, index: int) -> str:
    if index < rollout.phase:
        return "passed"
    if index > rollout.phase or rollout.phase_started_at is None:
        return "waiting"
    if rollout.state in {RolloutState.ABORTED, RolloutState.CANCELLED}:
        return "stopped"
    if rollout.state in {RolloutState.COMPLETED, RolloutState.AWAITING_APPROVAL}:
        return "passed"
    return "soaking" if rollout.phase_passed_at is not None else "running"


async def detail(session: AsyncSession, deployment_id: str) -> RolloutDetail:
    """The rollout with each phase's target counts and its transitions."""
    rollout = await get_rollout(session, deployment_id)
    base = _out(rollout)
    rows = (
        await session.exec(
            select(DeploymentTarget.phase, DeploymentTarget.status, func.count())
            .where(col(DeploymentTarget.deployment_id) == deployment_id)
            .group_by(col(DeploymentTarget.phase), col(DeploymentTarget.status))
        )
    ).all()
    counts: dict[int, dict[str, int]] = {}
    for phase, status, n in rows:
        if phase is not None:
            counts.setdefault(phase, {})[status] = n
    phases = [
        PhaseOut(
            index=i,
            name=p.name,
            percent=p.percent,
            devices=p.devices,
            state=_phase_state(rollout, i),
            total=sum(counts.get(i, {}).values()),
            counts=counts.get(i, {}),
        )
        for i, p in enumerate(base.strategy.phases)
    ]
    transitions = (
        await session.exec(
            select(RolloutTransition)
            .where(col(RolloutTransition.deployment_id) == deployment_id)
            .order_by(col(RolloutTransition.at), col(RolloutTransition.id))
        )
    ).all()
    return RolloutDetail(
        **base.model_dump(),
        deployment_id=deployment_id,
        phases=phases,
        transitions=[
            TransitionOut(
                at=t.at,
                event=t.event,
                state=RolloutState(t.state),
                phase=t.phase,
                actor=t.actor,
                reason=t.reason,
                details=t.details,
            )
            for t in transitions
        ],
    )


async def busy_devices(
    session: AsyncSession, device_ids: Sequence[str], *, other_than: str | None = None
) -> set[str]:
    """Those of the devices with a deployment (other than this one) in progress."""
    if not device_ids:
        return set()
    query = select(DeploymentTarget.device_id).where(
        col(DeploymentTarget.device_id).in_(list(device_ids)),
        col(DeploymentTarget.status).in_([s.value for s in ACTIVE_TARGET_STATUSES]),
    )
    if other_than is not None:
        query = query.where(col(DeploymentTarget.deployment_id) != other_than)
    return set((await session.exec(query)).all())


async def preview(
    session: AsyncSession, selector: Mapping[str, Any], strategy: RolloutStrategy | None
) -> RolloutPreview:
    """A dry run: the devices each phase would start were the rollout created now (no strategy: one phase)."""
    phases = strategy.phases if strategy is not None else [Phase(percent=100)]
    selected = await groups.resolve(session, selector)
    busy = await busy_devices(session, selected)
    planned = plan.preview(phases, selected=selected, busy=busy)
    window = strategy.maintenance_window if strategy is not None else None
    return RolloutPreview(
        selected=len(selected),
        busy=sorted(busy),
        phases=[
            PhasePreview(index=i, name=p.name, devices=devices)
            for i, (p, devices) in enumerate(zip(phases, planned, strict=True))
        ],
        maintenance_window_open=window.closes_at(datetime.now(UTC)) is not None if window else None,
    )


# Targets a rollout counts as its devices' outcomes.
FAILED_STATUSES = frozenset({TargetStatus.FAILED, TargetStatus.ROLLED_BACK, TargetStatus.REFUSED})
