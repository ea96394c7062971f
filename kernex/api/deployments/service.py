"""Deployments: create (one signed deploy command per device), list, inspect, cancel; rollback and history.

Raises domain errors, knows nothing of HTTP. Every mutation is written to the audit log, refusals
included. Commands are recorded in the same transaction as the deployment and published after
it commits (kernex.api.commands).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from fastapi import Request
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.audit import service as audit
from kernex.api.auth.schemas import Principal
from kernex.api.bundles.runtime import BundleRuntime
from kernex.api.commands import service as commands
from kernex.api.commands.runtime import CommandRuntime
from kernex.api.deployments.errors import (
    BundleGoneError,
    DeploymentActiveError,
    NoRollbackTargetError,
    NoTargetsError,
)
from kernex.api.deployments.schemas import (
    BundleHistory,
    BundleHistoryEntry,
    DeploymentCreate,
    DeploymentDetail,
    DeploymentOut,
    TargetOut,
)
from kernex.api.errors import ConflictError, NotFoundError, ServiceUnavailableError
from kernex.api.groups import service as groups
from kernex.api.rollouts import service as rollouts
from kernex.kit.logs import get_logger
from kernex.protocol.commands import DeployBody
from kernex.protocol.topics import CommandKind
from kernex.storage.bundles.exceptions import BundleStoreError, StoredObjectMissingError
from kernex.storage.deployments import (
    ACTIVE_TARGET_STATUSES,
    UNSTARTED_TARGET_STATUSES,
    DeploymentStatus,
    TargetStatus,
    recompute,
)
from kernex.storage.models import (
    AdmissionState,
    Bundle,
    Deployment,
    DeploymentTarget,
    Device,
    DeviceBundleHistory,
    DeviceCommand,
)

log = get_logger(__name__)

# Publishing a large rollout's commands inside the request would hold it for long; past this
# many the republisher sends them in the background.
INLINE_PUBLISH_MAX = 100
NAMED_IN_ERRORS = 5  # ids an error message lists before "and N more"


def _names(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:NAMED_IN_ERRORS])
    return shown if len(ids) <= NAMED_IN_ERRORS else f"{shown} and {len(ids) - NAMED_IN_ERRORS} more"


# --- create ---------------------------------------------------------------------------------


async def create(
    session: AsyncSession,
    runtime: CommandRuntime,
    bundles: BundleRuntime,
    body: DeploymentCreate,
    *,
    actor: Principal,
    default_timeout_s: int,
    request: Request | None = None,
) -> Deployment:
    """Create a deployment, one target and one signed deploy command per device; then publish.

    With a rollout strategy only the deployment and its rollout are created here: the rollout
    engine starts the phases (the caller runs its first step).
    """
    async with audit.audited(session, actor=actor, action="deployment.create", target=None, request=request):
        bundle = await deployable_bundle(session, bundles, body.bundle_id)
        device_ids = await _select_devices(session, body)
        if body.rollout is not None:
            return await _create_rollout(
                session,
                bundle,
                body,
                devices=len(device_ids),
                default_timeout_s=default_timeout_s,
                actor=actor,
                request=request,
            )
        deployment = await create_locked(
            session,
            runtime,
            bundle,
            device_ids,
            rollback=False,
            supersede=body.supersede,
            timeout_s=body.timeout_s or default_timeout_s,
            actor=actor,
        )
        await audit.record(
            session,
            actor=actor,
            action="deployment.create",
            target=f"deployment:{deployment.id}",
            outcome="success",
            request=request,
            details={
                "bundle_id": bundle.id,
                "version": bundle.version,
                "devices": len(device_ids),
                "supersede": body.supersede,
                "tags": body.tags,
            },
        )
    await publish_deployment(session, runtime, deployment.id)
    return deployment


async def _create_rollout(
    session: AsyncSession,
    bundle: Bundle,
    body: DeploymentCreate,
    *,
    devices: int,
    default_timeout_s: int,
    actor: Principal,
    request: Request | None,
) -> Deployment:
    assert body.rollout is not None
    deployment = Deployment(
        bundle_id=bundle.id,
        status=DeploymentStatus.PENDING.value,
        timeout_s=body.timeout_s or default_timeout_s,
        created_at=datetime.now(UTC),
        created_by=actor.actor,
    )
    session.add(deployment)
    await session.flush()  # the deployment row exists before the rollout that refers to it
    await rollouts.start(session, deployment.id, body.rollout, body.selector(), actor=actor.actor)
    await audit.record(
        session,
        actor=actor,
        action="deployment.create",
        target=f"deployment:{deployment.id}",
        outcome="success",
        request=request,
        details={
            "bundle_id": bundle.id,
            "version": bundle.version,
            "selected": devices,
            "selector": body.selector(),
            "rollout": body.rollout.model_dump(mode="json"),
        },
    )
    log.info("rollout created", deployment_id=deployment.id, bundle_id=bundle.id, selected=devices)
    return deployment


async def deployable_bundle(session: AsyncSession, bundles: BundleRuntime, bundle_id: str) -> Bundle:
    """The bundle, if it exists (404) and its archive is intact in the store (410)."""
    bundle = await session.get(Bundle, bundle_id)
    if bundle is None:
        raise NotFoundError(f"bundle {bundle_id} not found")
    if bundle.quarantined:
        raise BundleGoneError(f"bundle {bundle_id} is quarantined: its stored bytes failed verification")
    try:
        await bundles.store.stat(bundle.storage_key)
    except StoredObjectMissingError:
        raise BundleGoneError(f"bundle {bundle_id} is no longer in the bundle store") from None
    except BundleStoreError as exc:
        raise ServiceUnavailableError(f"bundle store unavailable: {exc}") from None
    return bundle


async def _select_devices(session: AsyncSession, body: DeploymentCreate) -> list[str]:
    if body.device_ids is not None:
        wanted = sorted(set(body.device_ids))
        rows = (await session.exec(select(Device.id, Device.state).where(col(Device.id).in_(wanted)))).all()
        states = dict(rows)
        missing = [d for d in wanted if d not in states]
        if missing:
            raise NotFoundError(f"no such devices: {_names(missing)}")
        inactive = [d for d, s in states.items() if s is not AdmissionState.ACTIVE]
        if inactive:
            raise ConflictError(
                f"devices not active (revoked, rejected or pending): {_names(sorted(inactive))}"
            )
        return wanted
    if body.group_id is not None:
        members = await groups.resolve(session, {"group_id": body.group_id})
        if not members:
            raise NoTargetsError(f"group {body.group_id} holds no active device")
        return members
    tags = set(body.tags or ())
    tagged = (
        await session.exec(select(Device.id, Device.tags).where(col(Device.state) == AdmissionState.ACTIVE))
    ).all()
    # Tags are a JSON list: matched here so SQLite and Postgres behave alike.
    selected = sorted(device_id for device_id, device_tags in tagged if tags <= set(device_tags or ()))
    if not selected:
        raise NoTargetsError(f"no active device carries all of the tags {sorted(tags)}")
    return selected


def deploy_body(deployment_id: str, bundle: Bundle, *, rollback: bool) -> DeployBody:
    """What a deploy command of this deployment carries."""
    return DeployBody(
        deployment_id=deployment_id,
        bundle_id=bundle.id,
        name=bundle.name,
        version=bundle.version,
        sha256=bundle.sha256,
        size=bundle.size,
        download_path=f"/api/v1/bundles/{bundle.id}/download",
        rollback=rollback,
    )


async def create_locked(
    session: AsyncSession,
    runtime: CommandRuntime,
    bundle: Bundle,
    device_ids: Sequence[str],
    *,
    rollback: bool,
    supersede: bool,
    timeout_s: int,
    actor: Principal | str,
) -> Deployment:
    """Create a deployment and its commands in the session's transaction (the caller commits).

    `actor` is the caller, or a plain name such as "system:rollout".
    """
    now = datetime.now(UTC)
    await commands.lock_devices(session, device_ids)
    busy = (
        await session.exec(
            select(DeploymentTarget)
            .where(
                col(DeploymentTarget.device_id).in_(device_ids),
                col(DeploymentTarget.status).in_([s.value for s in ACTIVE_TARGET_STATUSES]),
            )
            .order_by(col(DeploymentTarget.deployment_id), col(DeploymentTarget.device_id))
            .with_for_update()
        )
    ).all()
    deployment = Deployment(
        bundle_id=bundle.id,
        status=DeploymentStatus.PENDING.value,
        rollback=rollback,
        timeout_s=timeout_s,
        created_at=now,
        created_by=actor.actor if isinstance(actor, Principal) else actor,
    )
    if busy and not supersede:
        active = sorted({t.deployment_id for t in busy})
        devices = sorted({t.device_id for t in busy})
        raise DeploymentActiveError(
            f"deployment {_names(active)} is in progress on {_names(devices)}; "
            "pass supersede: true to replace it"
        )
    for target in busy:
        target.status = TargetStatus.SUPERSEDED.value
        target.error = f"superseded by deployment {deployment.id}"
        target.finished_at = now
        target.updated_at = now
        session.add(target)
    session.add(deployment)
    await session.flush()  # the deployment row exists before the commands that refer to it
    body = deploy_body(deployment.id, bundle, rollback=rollback)
    issued = await commands.issue(
        session, runtime.signer, [commands.CommandRequest(device_id=d, deploy=body) for d in device_ids], now
    )
    for command in issued:
        session.add(
            DeploymentTarget(
                deployment_id=deployment.id,
                device_id=command.device_id,
                status=TargetStatus.PENDING.value,
                revision=command.revision,
                command_id=command.id,
                updated_at=now,
            )
        )
    await session.flush()
    await recompute(await session.connection(), {deployment.id, *(t.deployment_id for t in busy)}, now)
    log.info(
        "deployment created",
        deployment_id=deployment.id,
        bundle_id=bundle.id,
        devices=len(device_ids),
        superseded=len(busy),
        rollback=rollback,
    )
    return deployment


async def publish_deployment(session: AsyncSession, runtime: CommandRuntime, deployment_id: str) -> None:
    """Publish the deployment's commands now, or leave a large rollout to the republisher."""
    rows = (
        await session.exec(
            select(DeviceCommand.device_id).where(col(DeviceCommand.deployment_id) == deployment_id)
        )
    ).all()
    topics = [(device_id, CommandKind.DEPLOY.value) for device_id in rows]
    if len(topics) > INLINE_PUBLISH_MAX:
        runtime.publisher.wake()
        return
    await runtime.publisher.sync_topics(topics)


# --- read -----------------------------------------------------------------------------------


async def get_deployment(session: AsyncSession, deployment_id: str) -> Deployment:
    """One deployment, or NotFoundError."""
    deployment = await session.get(Deployment, deployment_id, populate_existing=True)
    if deployment is None:
        raise NotFoundError(f"deployment {deployment_id} not found")
    return deployment


async def list_deployments(
    session: AsyncSession,
    *,
    status: DeploymentStatus | None,
    bundle_id: str | None,
    device_id: str | None,
    limit: int,
    offset: int,
) -> tuple[list[DeploymentOut], int]:
    """A page of deployments, newest first, with the total matching count."""
    conditions: list[sa.ColumnElement[bool]] = []
    if status is not None:
        conditions.append(col(Deployment.status) == status.value)
    if bundle_id is not None:
        conditions.append(col(Deployment.bundle_id) == bundle_id)
    if device_id is not None:
        conditions.append(
            col(Deployment.id).in_(
                select(DeploymentTarget.deployment_id).where(col(DeploymentTarget.device_id) == device_id)
            )
        )
    total = (await session.exec(select(func.count()).select_from(Deployment).where(*conditions))).one()
    rows = (
        await session.exec(
            select(Deployment)
            .where(*conditions)
            .order_by(col(Deployment.created_at).desc(), col(Deployment.id))
            .limit(limit)
            .offset(offset)
        )
    ).all()
    return [await to_out(session, d) for d in rows], total


async def to_out(session: AsyncSession, deployment: Deployment) -> DeploymentOut:
    """The summary view: bundle, aggregate status and counts by target status."""
    bundle = await session.get(Bundle, deployment.bundle_id)
    counts = dict(
        (
            await session.exec(
                select(DeploymentTarget.status, func.count())
                .where(col(DeploymentTarget.deployment_id) == deployment.id)
                .group_by(col(DeploymentTarget.status))
            )
        ).all()
    )
    return DeploymentOut(
        id=deployment.id,
        bundle_id=deployment.bundle_id,
        bundle_name=bundle.name if bundle else "",
        bundle_version=bundle.version if bundle else "",
        status=DeploymentStatus(deployment.status),
        rollback=deployment.rollback,
        timeout_s=deployment.timeout_s,
        created_at=deployment.created_at,
        created_by=deployment.created_by,
        finished_at=deployment.finished_at,
        cancelled_at=deployment.cancelled_at,
        cancelled_by=deployment.cancelled_by,
        total=sum(counts.values()),
        counts=counts,
        rollout=await rollouts.summary(session, deployment.id),
    )


async def to_detail(
    session: AsyncSession, deployment: Deployment, *, limit: int, offset: int
) -> DeploymentDetail:
    """The detail view: the summary and a page of targets with their command's state."""
    rows = (
        await session.exec(
            select(DeploymentTarget, DeviceCommand.state)
            .join(DeviceCommand, col(DeviceCommand.id) == col(DeploymentTarget.command_id), isouter=True)
            .where(col(DeploymentTarget.deployment_id) == deployment.id)
            .order_by(col(DeploymentTarget.device_id))
            .limit(limit)
            .offset(offset)
            .execution_options(populate_existing=True)
        )
    ).all()
    targets = [
        TargetOut(
            device_id=t.device_id,
            status=TargetStatus(t.status),
            error=t.error,
            started_at=t.started_at,
            updated_at=t.updated_at,
            finished_at=t.finished_at,
            command_id=t.command_id,
            revision=t.revision,
            command_state=state,
        )
        for t, state in rows
    ]
    summary = await to_out(session, deployment)
    return DeploymentDetail(
        **summary.model_dump(), targets=targets, targets_limit=limit, targets_offset=offset
    )


# --- cancel ---------------------------------------------------------------------------------


async def cancel(
    session: AsyncSession,
    runtime: CommandRuntime,
    deployment_id: str,
    *,
    actor: Principal,
    request: Request | None = None,
) -> Deployment:
    """Cancel: targets not yet started are cancelled and their retained commands cleared.

    Devices that already took the deployment up finish it (their reports are still recorded);
    the deployment's status is `cancelled` from now on.
    """
    target_name = f"deployment:{deployment_id}"
    async with audit.audited(
        session, actor=actor, action="deployment.cancel", target=target_name, request=request
    ):
        deployment = await get_deployment(session, deployment_id)
        # The rollout row first: the rollout engine locks it before targets and deployments.
        await rollouts.stop_for_cancel(session, deployment_id, actor=actor.actor)
        if deployment.cancelled_at is not None or deployment.status not in {
            DeploymentStatus.PENDING,
            DeploymentStatus.IN_PROGRESS,
        }:
            raise ConflictError(f"deployment {deployment_id} is {deployment.status}: nothing to cancel")
        now = datetime.now(UTC)
        # Targets before the deployment row: the order ingest's reports lock them in.
        targets = (
            await session.exec(
                select(DeploymentTarget)
                .where(col(DeploymentTarget.deployment_id) == deployment_id)
                .order_by(col(DeploymentTarget.device_id))
                .with_for_update()
            )
        ).all()
        unstarted = [t for t in targets if t.status in UNSTARTED_TARGET_STATUSES]
        for target in unstarted:
            target.status = TargetStatus.CANCELLED.value
            target.finished_at = now
            target.updated_at = now
            session.add(target)
        withdrawn = await commands.withdraw(session, [t.command_id for t in unstarted if t.command_id])
        deployment.cancelled_at = now
        deployment.cancelled_by = actor.actor
        session.add(deployment)
        await session.flush()
        await recompute(await session.connection(), [deployment_id], now)
        await audit.record(
            session,
            actor=actor,
            action="deployment.cancel",
            target=target_name,
            outcome="success",
            request=request,
            details={"cancelled_targets": len(unstarted), "running_targets": len(targets) - len(unstarted)},
        )
    topics = [(c.device_id, c.kind) for c in withdrawn]
    if len(topics) > INLINE_PUBLISH_MAX:
        runtime.publisher.wake()
    else:
        await runtime.publisher.sync_topics(topics)
    log.info("deployment cancelled", deployment_id=deployment_id, cleared=len(topics))
    return await get_deployment(session, deployment_id)


# --- rollback and history -------------------------------------------------------------------


async def bundle_history(session: AsyncSession, device_id: str, *, limit: int) -> BundleHistory:
    """The device's bundle history, newest first."""
    if await session.get(Device, device_id) is None:
        raise NotFoundError(f"device {device_id} not found")
    rows = (
        await session.exec(
            select(DeviceBundleHistory, Bundle.name, Deployment.rollback)
            .join(Bundle, col(Bundle.id) == col(DeviceBundleHistory.bundle_id), isouter=True)
            .join(Deployment, col(Deployment.id) == col(DeviceBundleHistory.deployment_id), isouter=True)
            .where(col(DeviceBundleHistory.device_id) == device_id)
            .order_by(col(DeviceBundleHistory.started_at).desc(), col(DeviceBundleHistory.id).desc())
            .limit(limit)
        )
    ).all()
    return BundleHistory(
        device_id=device_id,
        items=[
            BundleHistoryEntry(
                bundle_id=h.bundle_id,
                bundle_name=name,
                version=h.version,
                deployment_id=h.deployment_id,
                rollback=bool(rollback),
                result=h.result,
                started_at=h.started_at,
                finished_at=h.finished_at,
            )
            for h, name, rollback in rows
        ],
    )


async def rollback(
    session: AsyncSession,
    runtime: CommandRuntime,
    bundles: BundleRuntime,
    device_id: str,
    *,
    bundle_id: str | None,
    supersede: bool,
    actor: Principal,
    default_timeout_s: int,
    request: Request | None = None,
) -> Deployment:
    """Deploy an earlier bundle to one device with a signed `rollback: true` command.

    Without bundle_id: the newest bundle that succeeded on the device other than the one it
    runs now. 409 if there is none, 404 if a named bundle does not exist, 410 if the bundle's
    archive is gone from the store.
    """
    target_name = f"device:{device_id}"
    async with audit.audited(
        session, actor=actor, action="device.rollback", target=target_name, request=request
    ):
        device = await session.get(Device, device_id)
        if device is None:
            raise NotFoundError(f"device {device_id} not found")
        if device.state is not AdmissionState.ACTIVE:
            raise ConflictError(f"device {device_id} is {device.state.value}")
        chosen = bundle_id or await _previous_successful(session, device)
        bundle = await deployable_bundle(session, bundles, chosen)
        deployment = await create_locked(
            session,
            runtime,
            bundle,
            [device_id],
            rollback=True,
            supersede=supersede,
            timeout_s=default_timeout_s,
            actor=actor,
        )
        await audit.record(
            session,
            actor=actor,
            action="device.rollback",
            target=target_name,
            outcome="success",
            request=request,
            details={"bundle_id": bundle.id, "version": bundle.version, "deployment_id": deployment.id},
        )
    await publish_deployment(session, runtime, deployment.id)
    return deployment


async def _previous_successful(session: AsyncSession, device: Device) -> str:
    succeeded = (
        await session.exec(
            select(DeviceBundleHistory.bundle_id)
            .where(
                col(DeviceBundleHistory.device_id) == device.id,
                col(DeviceBundleHistory.result) == "succeeded",
            )
            .order_by(col(DeviceBundleHistory.finished_at).desc(), col(DeviceBundleHistory.id).desc())
        )
    ).all()
    # What the device runs: what its heartbeat reports if the platform deployed that, else the
    # newest bundle that succeeded on it.
    current = device.bundle_id if device.bundle_id in succeeded else (succeeded[0] if succeeded else None)
    previous = next((b for b in succeeded if b != current), None)
    if previous is None:
        raise NoRollbackTargetError(
            f"device {device.id} has no earlier successful bundle to roll back to; name one with bundle_id"
        )
    return previous
