"""`/api/v1/deployments` and a device's rollback and bundle history.

The deployments router carries the commands domain's lifespan (signing key, republisher,
sweeper: kernex.api.commands.runtime); include it once.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status

from kernex.api.auth.deps import OperatorDep, ViewerDep
from kernex.api.bundles.runtime import RuntimeDep
from kernex.api.commands.runtime import CommandsDep, lifespan
from kernex.api.deployments import service
from kernex.api.deployments.schemas import (
    BundleHistory,
    DeploymentCreate,
    DeploymentDetail,
    DeploymentPage,
    RollbackRequest,
)
from kernex.api.deps import SessionDep, SettingsDep
from kernex.api.rollouts.engine import EngineDep
from kernex.storage.deployments import DeploymentStatus

PAGE_MAX = 500  # bounds one response's size and query cost
TARGETS_MAX = 1000

router = APIRouter(prefix="/api/v1/deployments", tags=["deployments"], lifespan=lifespan)
device_router = APIRouter(prefix="/api/v1/devices", tags=["deployments"])

TargetsLimit = Annotated[int, Query(ge=1, le=TARGETS_MAX, description="Targets listed in the response")]
TargetsOffset = Annotated[int, Query(ge=0, le=10_000_000)]


@router.post(
    "",
    response_model=DeploymentDetail,
    status_code=status.HTTP_201_CREATED,
    operation_id="createDeployment",
    responses={
        404: {"description": "No such bundle, device or group, or no active device is selected"},
        409: {"description": "A device has a deployment in progress (named); pass supersede: true"},
        410: {"description": "The bundle's archive is gone from the store or quarantined"},
    },
)
async def create_deployment(
    body: DeploymentCreate,
    request: Request,
    session: SessionDep,
    runtime: CommandsDep,
    bundles: RuntimeDep,
    settings: SettingsDep,
    rollouts: EngineDep,
    principal: OperatorDep,
) -> DeploymentDetail:
    """Deploy a bundle: one target and one signed, retained deploy command per device.

    With a `rollout` strategy, devices start in phases: the first phase starts now.
    """
    deployment = await service.create(
        session,
        runtime,
        bundles,
        body,
        actor=principal,
        default_timeout_s=settings.deployment_timeout_s,
        request=request,
    )
    if body.rollout is not None:
        await rollouts.step(deployment.id)
    return await service.to_detail(session, deployment, limit=TARGETS_MAX, offset=0)


@router.get("", response_model=DeploymentPage, operation_id="listDeployments")
async def list_deployments(
    session: SessionDep,
    _viewer: ViewerDep,
    status: DeploymentStatus | None = None,
    bundle_id: Annotated[str | None, Query(max_length=64)] = None,
    device_id: Annotated[str | None, Query(max_length=64, description="Deployments targeting it")] = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> DeploymentPage:
    """Deployments, newest first, by status, bundle or device."""
    items, total = await service.list_deployments(
        session, status=status, bundle_id=bundle_id, device_id=device_id, limit=limit, offset=offset
    )
    return DeploymentPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/{deployment_id}", response_model=DeploymentDetail, operation_id="getDeployment")
async def get_deployment(
    deployment_id: str,
    session: SessionDep,
    _viewer: ViewerDep,
    targets_limit: TargetsLimit = 500,
    targets_offset: TargetsOffset = 0,
) -> DeploymentDetail:
    """A deployment: aggregate status, counts by target status, and each device's status."""
    deployment = await service.get_deployment(session, deployment_id)
    return await service.to_detail(session, deployment, limit=targets_limit, offset=targets_offset)


@router.post(
    "/{deployment_id}/cancel",
    response_model=DeploymentDetail,
    operation_id="cancelDeployment",
    responses={409: {"description": "The deployment already finished or was cancelled"}},
)
async def cancel_deployment(
    deployment_id: str,
    request: Request,
    session: SessionDep,
    runtime: CommandsDep,
    principal: OperatorDep,
) -> DeploymentDetail:
    """Cancel: devices that have not started get their retained command cleared."""
    deployment = await service.cancel(session, runtime, deployment_id, actor=principal, request=request)
    return await service.to_detail(session, deployment, limit=TARGETS_MAX, offset=0)


@device_router.get("/{device_id}/bundle-history", response_model=BundleHistory, operation_id="bundleHistory")
async def bundle_history(
    device_id: str,
    session: SessionDep,
    _viewer: ViewerDep,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 100,
) -> BundleHistory:
    """The bundles a device ran, newest first: version, deployment, result and times."""
    return await service.bundle_history(session, device_id, limit=limit)


@device_router.post(
    "/{device_id}/rollback",
    response_model=DeploymentDetail,
    status_code=status.HTTP_201_CREATED,
    operation_id="rollbackDevice",
    responses={
        404: {"description": "No such device or bundle"},
        409: {"description": "No earlier successful bundle, or a deployment is in progress"},
        410: {"description": "The bundle's archive is gone from the store or quarantined"},
    },
)
async def rollback_device(
    device_id: str,
    body: RollbackRequest,
    request: Request,
    session: SessionDep,
    runtime: CommandsDep,
    bundles: RuntimeDep,
    settings: SettingsDep,
    principal: OperatorDep,
) -> DeploymentDetail:
    """Roll a device back (a signed deploy command with rollback: true), by default to its previous bundle."""
    deployment = await service.rollback(
        session,
        runtime,
        bundles,
        device_id,
        bundle_id=body.bundle_id,
        supersede=body.supersede,
        actor=principal,
        default_timeout_s=settings.deployment_timeout_s,
        request=request,
    )
    return await service.to_detail(session, deployment, limit=TARGETS_MAX, offset=0)
