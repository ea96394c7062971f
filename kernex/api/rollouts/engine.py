"""The rollout engine: starts phases, issues their commands at the allowed pace, aborts, reverts.

One background task per API process (owned by the app's lifespan, like the sweeper) steps every
rollout still going each KERNEX_ROLLOUT_INTERVAL_S, and at once when a request wakes it. A step
begins by writing the rollout's row, so concurrent steps of one rollout (several API processes,
or a request and the task) queue on that row instead of acting twice. Each step:

1. Queues again the targets whose command expired unread (a maintenance window closed on them).
2. Aborts if an abort criterion is met: failures (count, or share of finished devices once
   enough finished), or updated devices offline/unhealthy within the soak time. Queued and not
   yet started targets are cancelled (their retained commands cleared); if configured, devices
   the rollout updated get a rollback deployment to the bundle they ran before.
3. Starts the current phase if it has not started: evaluates the selector now (dynamic groups
   pick up new devices) and queues the devices the phase takes (kernex.api.rollouts.plan).
4. Issues commands for queued targets, inside the maintenance window and within the rate limit.
5. Passes the phase once its success threshold is reached, then after the soak time (with
   healthy heartbeats from its updated devices) completes the rollout, waits for approval, or
   starts the next phase. A phase whose devices all finished below the threshold stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.bundles.runtime import BundleRuntime
from kernex.api.commands import service as commands
from kernex.api.commands.runtime import CommandRuntime
from kernex.api.deployments import service as deployments
from kernex.api.errors import ApiError, ServiceUnavailableError
from kernex.api.groups import service as groups
from kernex.api.rollouts import plan
from kernex.api.rollouts import service as rollouts
from kernex.api.rollouts.feed import RolloutFeed
from kernex.api.rollouts.schemas import RolloutStrategy
from kernex.api.state import AppState
from kernex.kit.logs import get_logger
from kernex.kit.pacer import Pacer
from kernex.protocol.topics import CommandKind, Topics
from kernex.storage.deployments import (
    ACTIVE_ROLLOUT_STATES,
    ACTIVE_TARGET_STATUSES,
    IN_PROGRESS_STATUSES,
    UNSTARTED_TARGET_STATUSES,
    RolloutState,
    TargetStatus,
    recompute,
)
from kernex.storage.models import (
    Bundle,
    ConnectionState,
    Deployment,
    DeploymentTarget,
    Device,
    DeviceBundleHistory,
    DeviceCommand,
    Rollout,
)

log = get_logger(__name__)

ACTOR = "system:rollout"  # how the audit log and created_by name the engine
HEALTHY = frozenset({"ok"})  # the heartbeat status of a healthy device
# Marks a target whose device could not be reverted (no earlier bundle, or it is gone), so the
# engine does not try again every step; the transition says why.
REVERT_IMPOSSIBLE = "none"
NAMED_IN_DETAILS = 50  # device ids a transition lists


@dataclass
class _Step:
    """What one step leaves to do after its commits: topics and deployments to publish."""

    topics: list[tuple[str, str]] = field(default_factory=list)
    deployments: list[str] = field(default_factory=list)


class RolloutEngine:
    """Steps rollouts; `run` is the background task, `step` one rollout now (requests call it)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        commands_runtime: CommandRuntime,
        bundles: BundleRuntime,
        interval_s: float,
    ) -> None:
        self._sessions = sessions
        self._commands = commands_runtime
        self._bundles = bundles
        self._pace = Pacer(interval_s)

    def wake(self) -> None:
        """Ask for a pass over every rollout now."""
        self._pace.wake()

    async def run(self) -> None:
        """Step every rollout that may change, each interval or when woken; outages pause it."""
        while True:
            self._pace.begin()
            try:
                for deployment_id in await self._due():
                    await self._step_guarded(deployment_id)
            except (OSError, sa.exc.SQLAlchemyError) as exc:
                log.warning(
                    "rollout pass skipped: database unavailable", error=f"{type(exc).__name__}: {exc}"
                )
            await self._pace.wait()

    async def _step_guarded(self, deployment_id: str) -> None:
        try:
            await self.step(deployment_id)
        except (OSError, sa.exc.SQLAlchemyError):
            raise  # the database is down: the whole pass waits
        # A bug in one rollout's step is logged with its traceback; it must not stop every other rollout.
        except Exception:
            log.exception("rollout step failed", deployment_id=deployment_id)

    async def _due(self) -> list[str]:
        async with self._sessions() as session:
            active = (
                await session.exec(
                    select(Rollout.deployment_id).where(
                        col(Rollout.state).in_([s.value for s in ACTIVE_ROLLOUT_STATES])
                    )
                )
            ).all()
            # Aborted rollouts keep reverting devices that finish updating after the abort.
            reverting = (
                await session.exec(
                    select(Rollout.deployment_id, Rollout.strategy).where(
                        col(Rollout.state) == RolloutState.ABORTED.value,
                        sa.exists().where(
                            col(DeploymentTarget.deployment_id) == col(Rollout.deployment_id),
                            col(DeploymentTarget.phase).is_not(None),
                            col(DeploymentTarget.reverted_by).is_(None),
                            col(DeploymentTarget.status).in_(
                                [TargetStatus.SUCCEEDED.value, *(s.value for s in IN_PROGRESS_STATUSES)]
                            ),
                        ),
                    )
                )
            ).all()
        return [*active, *(d for d, strategy in reverting if strategy.get("abort", {}).get("rollback"))]

    async def step(self, deployment_id: str, now: datetime | None = None) -> None:
        """Bring one rollout up to date; publish what it issued or withdrew."""
        now = now or datetime.now(UTC)
        todo = _Step()
        try:
            async with self._sessions() as session:
                await self._step(session, deployment_id, now, todo)
                await session.commit()
                await rollouts.audit_queued(session)
        except ApiError as exc:
            # A domain refusal inside a step (a bundle gone from the store...) is the rollout's
            # state of affairs, not the caller's error: logged, and the next pass tries again.
            log.warning("rollout step refused", deployment_id=deployment_id, error=str(exc), code=exc.code)
        if todo.topics:
            await self._commands.publisher.sync_topics(todo.topics)
        for revert_id in todo.deployments:
            async with self._sessions() as session:
                await deployments.publish_deployment(session, self._commands, revert_id)

    async def _step(self, session: AsyncSession, deployment_id: str, now: datetime, todo: _Step) -> None:
        # The first statement writes: the rollout's row is this step's lock (on SQLite, the file's).
        claimed = await session.exec(
            sa.update(Rollout)
            .where(
                col(Rollout.deployment_id) == deployment_id,
                col(Rollout.state).in_(
                    [*(s.value for s in ACTIVE_ROLLOUT_STATES), RolloutState.ABORTED.value]
                ),
            )
            .values(updated_at=now)
        )
        if not claimed.rowcount:
            return
        rollout = await rollouts.get_rollout(session, deployment_id)
        deployment = await deployments.get_deployment(session, deployment_id)
        strategy = RolloutStrategy.model_validate(rollout.strategy)
        if rollout.state == RolloutState.ABORTED:
            if strategy.abort.rollback:
                await self._revert(session, rollout, deployment, todo)
            return
        await self._requeue_expired(session, deployment_id, now)
        reason = await self._abort_reason(session, strategy, deployment_id, now)
        if reason is not None:
            await self._abort(
                session,
                rollout=rollout,
                deployment=deployment,
                strategy=strategy,
                reason=reason,
                now=now,
                todo=todo,
            )
            return
        # Each pass either waits (returns) or moves to the next phase: at most one pass per phase.
        for _ in range(len(strategy.phases)):
            if rollout.state != RolloutState.RUNNING or not await self._advance(
                session, rollout=rollout, deployment=deployment, strategy=strategy, now=now, todo=todo
            ):
                break

    # --- targets ---------------------------------------------------------------------------

    async def _targets(self, session: AsyncSession, deployment_id: str) -> list[DeploymentTarget]:
        rows = await session.exec(
            select(DeploymentTarget)
            .where(col(DeploymentTarget.deployment_id) == deployment_id)
            .order_by(col(DeploymentTarget.device_id))
            .execution_options(populate_existing=True)
        )
        return list(rows.all())

    async def _requeue_expired(self, session: AsyncSession, deployment_id: str, now: datetime) -> None:
        expired = select(DeviceCommand.id).where(
            col(DeviceCommand.deployment_id) == deployment_id, col(DeviceCommand.expires_at) <= now
        )
        requeued = await session.exec(
            sa.update(DeploymentTarget)
            .where(
                col(DeploymentTarget.deployment_id) == deployment_id,
                col(DeploymentTarget.status) == TargetStatus.PENDING.value,
                col(DeploymentTarget.command_id).in_(expired),
            )
            .values(status=TargetStatus.QUEUED.value, command_id=None, updated_at=now)
        )
        if requeued.rowcount:
            log.info(
                "rollout targets queued again: command expired unread",
                deployment_id=deployment_id,
                targets=requeued.rowcount,
            )

    # --- abort -----------------------------------------------------------------------------

    async def _abort_reason(
        self, session: AsyncSession, strategy: RolloutStrategy, deployment_id: str, now: datetime
    ) -> str | None:
        criteria = strategy.abort
        targets = [t for t in await self._targets(session, deployment_id) if t.phase is not None]
        failed = sum(t.status in rollouts.FAILED_STATUSES for t in targets)
        succeeded = [t for t in targets if t.status == TargetStatus.SUCCEEDED]
        finished = failed + len(succeeded)
        if criteria.after_failures is not None and failed >= criteria.after_failures:
            return f"{failed} devices failed (abort after {criteria.after_failures})"
        if (
            criteria.after_failure_percent is not None
            and finished >= criteria.min_finished
            and failed * 100 / finished >= criteria.after_failure_percent
        ):
            return (
                f"{failed} of {finished} finished devices failed ({failed * 100 / finished:.0f}%, "
                f"abort at {criteria.after_failure_percent:g}%)"
            )
        if criteria.after_unhealthy is not None and strategy.soak_s:
            soaking = [
                t
                for t in succeeded
                if t.finished_at and now <= t.finished_at + timedelta(seconds=strategy.soak_s)
            ]
            unhealthy = await self._unhealthy(session, soaking)
            if len(unhealthy) >= criteria.after_unhealthy:
                return (
                    f"{len(unhealthy)} updated devices went offline or unhealthy within the soak time "
                    f"(abort after {criteria.after_unhealthy}): {', '.join(unhealthy[:5])}"
                )
        return None

    async def _unhealthy(self, session: AsyncSession, targets: Sequence[DeploymentTarget]) -> list[str]:
        if not targets:
            return []
        finished = {t.device_id: t.finished_at for t in targets}
        devices = (
            await session.exec(
                select(Device)
                .where(col(Device.id).in_(list(finished)))
                .execution_options(populate_existing=True)
            )
        ).all()
        bad: list[str] = []
        for device in devices:
            since = finished[device.id]
            offline = device.status == ConnectionState.OFFLINE
            # Only a heartbeat sent after the update counts: the one before was the old bundle's.
            sick = (
                device.health not in HEALTHY
                and device.health is not None
                and device.last_heartbeat_at is not None
                and since is not None
                and device.last_heartbeat_at >= since
            )
            if offline or sick:
                bad.append(device.id)
        return sorted(bad)

    async def _abort(
        self,
        session: AsyncSession,
        *,
        rollout: Rollout,
        deployment: Deployment,
        strategy: RolloutStrategy,
        reason: str,
        now: datetime,
        todo: _Step,
    ) -> None:
        targets = await self._targets(session, deployment.id)
        unstarted = [t for t in targets if t.status in UNSTARTED_TARGET_STATUSES]
        for target in unstarted:
            target.status = TargetStatus.CANCELLED.value
            target.error = f"rollout aborted: {reason}"
            target.finished_at = now
            target.updated_at = now
            session.add(target)
        withdrawn = await commands.withdraw(session, [t.command_id for t in unstarted if t.command_id])
        rollout.state = RolloutState.ABORTED.value
        rollout.stop_reason = reason
        rollout.stopped_at = now
        session.add(rollout)
        await session.flush()
        await recompute(await session.connection(), [deployment.id], now)
        rollouts.transition(
            session,
            deployment.id,
            event="aborted",
            state=RolloutState.ABORTED,
            phase=rollout.phase,
            actor=ACTOR,
            reason=reason,
            details={"cancelled_targets": len(unstarted), "rollback": strategy.abort.rollback},
        )
        log.warning("rollout aborted", deployment_id=deployment.id, phase=rollout.phase, reason=reason)
        todo.topics += [(c.device_id, c.kind) for c in withdrawn]
        if strategy.abort.rollback:
            await self._revert(session, rollout, deployment, todo)

    async def _revert(
        self, session: AsyncSession, rollout: Rollout, deployment: Deployment, todo: _Step
    ) -> None:
        """Roll the devices this rollout updated back to the bundle each ran before it."""
        updated = [
            t
            for t in await self._targets(session, deployment.id)
            if t.phase is not None and t.reverted_by is None and t.status == TargetStatus.SUCCEEDED
        ]
        if not updated:
            return
        by_bundle: dict[str, list[DeploymentTarget]] = {}
        impossible: dict[str, str] = {}
        for target in updated:
            previous = (
                await session.exec(
                    select(DeviceBundleHistory.bundle_id)
                    .where(
                        col(DeviceBundleHistory.device_id) == target.device_id,
                        col(DeviceBundleHistory.result) == TargetStatus.SUCCEEDED.value,
                        col(DeviceBundleHistory.bundle_id) != deployment.bundle_id,
                    )
                    .order_by(col(DeviceBundleHistory.finished_at).desc(), col(DeviceBundleHistory.id).desc())
                    .limit(1)
                )
            ).first()
            if previous is None:
                impossible[target.device_id] = "no earlier successful bundle"
            else:
                by_bundle.setdefault(previous, []).append(target)
        created: dict[str, str] = {}
        for bundle_id, targets in sorted(by_bundle.items()):
            try:
                bundle = await deployments.deployable_bundle(session, self._bundles, bundle_id)
            except ServiceUnavailableError:
                raise  # the store is down: the next step tries again
            except ApiError as exc:
                impossible.update({t.device_id: str(exc) for t in targets})
                continue
            revert = await deployments.create_locked(
                session,
                self._commands,
                bundle,
                [t.device_id for t in targets],
                rollback=True,
                supersede=True,
                timeout_s=deployment.timeout_s,
                actor=ACTOR,
            )
            created[bundle.id] = revert.id
            for target in targets:
                target.reverted_by = revert.id
                session.add(target)
            todo.deployments.append(revert.id)
        for target in updated:
            if target.device_id in impossible:
                target.reverted_by = REVERT_IMPOSSIBLE
                session.add(target)
        await session.flush()
        rollouts.transition(
            session,
            deployment.id,
            event="reverted",
            state=RolloutState(rollout.state),
            phase=rollout.phase,
            actor=ACTOR,
            details={
                "rollback_deployments": created,
                "devices": sorted(
                    t.device_id for ts in by_bundle.values() for t in ts if t.reverted_by != REVERT_IMPOSSIBLE
                )[:NAMED_IN_DETAILS],
                "not_reverted": dict(sorted(impossible.items())[:NAMED_IN_DETAILS]),
            },
        )
        log.info(
            "rollout reverted devices",
            deployment_id=deployment.id,
            rollbacks=created,
            not_reverted=len(impossible),
        )

    # --- phases ----------------------------------------------------------------------------

    async def _advance(
        self,
        session: AsyncSession,
        *,
        rollout: Rollout,
        deployment: Deployment,
        strategy: RolloutStrategy,
        now: datetime,
        todo: _Step,
    ) -> bool:
        """Start, feed and judge the current phase; True when it moved on to the next phase."""
        index = rollout.phase
        if rollout.phase_started_at is None:
            await self._start_phase(session, rollout, deployment, strategy, now)
        await self._release(session, deployment, strategy, now, todo)
        phase_targets = [t for t in await self._targets(session, deployment.id) if t.phase == index]
        size = len(phase_targets)
        succeeded = [t for t in phase_targets if t.status == TargetStatus.SUCCEEDED]
        share = 100.0 if size == 0 else len(succeeded) * 100 / size
        threshold = strategy.success_threshold_percent
        if rollout.phase_passed_at is None:
            if share < threshold:
                if not any(t.status in ACTIVE_TARGET_STATUSES for t in phase_targets):
                    # Reports that arrived since the abort check may meet an abort criterion: its
                    # reason says more than the threshold's.
                    reason = await self._abort_reason(session, strategy, deployment.id, now) or (
                        f"phase {index + 1} finished with {len(succeeded)} of {size} devices succeeded "
                        f"({share:.0f}%), below the {threshold:g}% success threshold"
                    )
                    await self._abort(
                        session,
                        rollout=rollout,
                        deployment=deployment,
                        strategy=strategy,
                        reason=reason,
                        now=now,
                        todo=todo,
                    )
                return False
            rollout.phase_passed_at = now
            session.add(rollout)
            rollouts.transition(
                session,
                deployment.id,
                event="phase_passed",
                state=RolloutState.RUNNING,
                phase=index,
                actor=ACTOR,
                details={"succeeded": len(succeeded), "devices": size, "soak_s": strategy.soak_s},
            )
        passed_at = rollout.phase_passed_at
        if strategy.soak_s:
            soaked = passed_at + timedelta(seconds=strategy.soak_s)
            if now < soaked or not await self._healthy_since(session, succeeded, passed_at):
                return False
        if index + 1 >= len(strategy.phases):
            await self._finish(session, rollout, deployment, now)
            return False
        if strategy.require_approval:
            rollout.state = RolloutState.AWAITING_APPROVAL.value
            session.add(rollout)
            rollouts.transition(
                session,
                deployment.id,
                event="awaiting_approval",
                state=RolloutState.AWAITING_APPROVAL,
                phase=index,
                actor=ACTOR,
                reason=f"phase {index + 2} waits for POST /api/v1/deployments/{deployment.id}/approve",
            )
            return False
        rollout.phase = index + 1
        rollout.phase_started_at = None
        rollout.phase_passed_at = None
        session.add(rollout)
        return True

    async def _healthy_since(
        self, session: AsyncSession, targets: Sequence[DeploymentTarget], since: datetime
    ) -> bool:
        if not targets:
            return True
        ids = [t.device_id for t in targets]
        devices = (
            await session.exec(
                select(Device).where(col(Device.id).in_(ids)).execution_options(populate_existing=True)
            )
        ).all()
        return all(
            d.status == ConnectionState.ONLINE
            and (d.health is None or d.health in HEALTHY)
            and d.last_heartbeat_at is not None
            and d.last_heartbeat_at >= since
            for d in devices
        )

    async def _finish(
        self, session: AsyncSession, rollout: Rollout, deployment: Deployment, now: datetime
    ) -> None:
        rollout.state = RolloutState.COMPLETED.value
        rollout.stopped_at = now
        session.add(rollout)
        await session.flush()
        await recompute(await session.connection(), [deployment.id], now)
        rollouts.transition(
            session,
            deployment.id,
            event="completed",
            state=RolloutState.COMPLETED,
            phase=rollout.phase,
            actor=ACTOR,
        )
        log.info("rollout completed", deployment_id=deployment.id, phases=rollout.phase + 1)

    async def _start_phase(
        self,
        session: AsyncSession,
        rollout: Rollout,
        deployment: Deployment,
        strategy: RolloutStrategy,
        now: datetime,
    ) -> None:
        index = rollout.phase
        selected = await groups.resolve(session, rollout.selector)
        covered = [t.device_id for t in await self._targets(session, deployment.id)]
        candidates = sorted(set(selected) - set(covered))
        if candidates:
            # Held until commit, so no deployment starts on them between this check and the insert.
            await commands.lock_devices(session, candidates)
        busy = await rollouts.busy_devices(session, candidates, other_than=deployment.id)
        chosen = plan.pick(strategy.phases[index], selected=selected, covered=covered, busy=busy)
        session.add_all(
            DeploymentTarget(
                deployment_id=deployment.id,
                device_id=device_id,
                status=TargetStatus.QUEUED.value,
                phase=index,
                updated_at=now,
            )
            for device_id in chosen
        )
        rollout.phase_started_at = now
        rollout.phase_passed_at = None
        session.add(rollout)
        await session.flush()
        await recompute(await session.connection(), [deployment.id], now)
        rollouts.transition(
            session,
            deployment.id,
            event="phase_started",
            state=RolloutState.RUNNING,
            phase=index,
            actor=ACTOR,
            details={
                "devices": len(chosen),
                "selected": len(selected),
                "busy_skipped": sorted(busy)[:NAMED_IN_DETAILS],
                "device_ids": chosen[:NAMED_IN_DETAILS],
            },
        )
        log.info("rollout phase started", deployment_id=deployment.id, phase=index, devices=len(chosen))

    async def _release(
        self,
        session: AsyncSession,
        deployment: Deployment,
        strategy: RolloutStrategy,
        now: datetime,
        todo: _Step,
    ) -> None:
        """Issue commands for queued targets: inside the window, within the rate limit."""
        queued = [t for t in await self._targets(session, deployment.id) if t.status == TargetStatus.QUEUED]
        if not queued:
            return
        expires_at: datetime | None = None
        if strategy.maintenance_window is not None:
            expires_at = strategy.maintenance_window.closes_at(now)
            if expires_at is None:
                return  # outside the window: nothing is sent
        allowed = len(queued)
        if strategy.rate_limit is not None:
            since = now - timedelta(seconds=strategy.rate_limit.period_s)
            recent = (
                await session.exec(
                    select(func.count())
                    .select_from(DeviceCommand)
                    .where(
                        col(DeviceCommand.deployment_id) == deployment.id,
                        col(DeviceCommand.issued_at) > since,
                    )
                )
            ).one()
            allowed = max(0, strategy.rate_limit.devices - recent)
        batch = sorted(queued, key=lambda t: (t.phase or 0, t.device_id))[:allowed]
        if not batch:
            return
        bundle = await session.get(Bundle, deployment.bundle_id)
        if bundle is None:
            return  # bundles referenced by deployments cannot be deleted; nothing to send
        ids = [t.device_id for t in batch]
        await commands.lock_devices(session, ids)
        body = deployments.deploy_body(deployment.id, bundle, rollback=deployment.rollback)
        issued = await commands.issue(
            session,
            self._commands.signer,
            [commands.CommandRequest(device_id=d, deploy=body) for d in ids],
            now,
            expires_at=expires_at,
        )
        for target, command in zip(batch, issued, strict=True):
            target.status = TargetStatus.PENDING.value
            target.command_id = command.id
            target.revision = command.revision
            target.updated_at = now
            session.add(target)
        await session.flush()
        await recompute(await session.connection(), [deployment.id], now)
        todo.topics += [(d, CommandKind.DEPLOY.value) for d in ids]
        log.info(
            "rollout commands issued", deployment_id=deployment.id, devices=len(ids), expires_at=expires_at
        )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the rollout engine for the app's lifetime (after the commands and bundles lifespans)."""
    state: AppState = app.state.kernex
    engine = RolloutEngine(
        state.sessions, app.state.commands, app.state.bundles, state.settings.rollout_interval_s
    )
    app.state.rollouts = engine
    feed = RolloutFeed(state.sessions, state.broker, Topics(state.settings.topic_prefix))
    tasks = [
        asyncio.create_task(engine.run(), name="rollout-engine"),
        asyncio.create_task(feed.run(), name="rollout-feed"),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def get_engine(request: Request) -> RolloutEngine:
    """The app's rollout engine."""
    engine: RolloutEngine = request.app.state.rollouts
    return engine


EngineDep = Annotated[RolloutEngine, Depends(get_engine)]
