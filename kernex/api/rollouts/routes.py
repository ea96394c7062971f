"""`/api/v1/deployments/preview`, `.../{id}/rollout` and `.../{id}/approve`: phased rollouts.

A rollout is created like any deployment (`POST /api/v1/deployments` with a `rollout` strategy).
This router carries the rollout engine's lifespan: include it after the deployments router,
whose lifespan provides the command runtime.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from kernex.api.auth.deps import OperatorDep, ViewerDep
from kernex.api.bundles.runtime import RuntimeDep
from kernex.api.deployments import service as deployments
from kernex.api.deployments.schemas import DeploymentCreate
from kernex.api.deps import SessionDep
from kernex.api.rollouts import service
from kernex.api.rollouts.engine import EngineDep, lifespan
from kernex.api.rollouts.schemas import RolloutDetail, RolloutPreview

router = APIRouter(prefix="/api/v1/deployments", tags=["rollouts"], lifespan=lifespan)


@router.post(
    "/preview",
    response_model=RolloutPreview,
    operation_id="previewDeployment",
    responses={404: {"description": "No such bundle or group"}, 410: {"description": "The bundle is gone"}},
)
async def preview(
    body: DeploymentCreate, session: SessionDep, bundles: RuntimeDep, _viewer: ViewerDep
) -> RolloutPreview:
    """Dry run: the devices each phase of this deployment would start, evaluated now; nothing is created."""
    await deployments.deployable_bundle(session, bundles, body.bundle_id)
    return await service.preview(session, body.selector(), body.rollout)


@router.get("/{deployment_id}/rollout", response_model=RolloutDetail, operation_id="getRollout")
async def get_rollout(deployment_id: str, session: SessionDep, _viewer: ViewerDep) -> RolloutDetail:
    """The rollout: state, current phase, each phase's counts, why it stopped, every transition."""
    return await service.detail(session, deployment_id)


@router.post(
    "/{deployment_id}/approve",
    response_model=RolloutDetail,
    operation_id="approveRolloutPhase",
    responses={409: {"description": "The rollout is not awaiting approval"}},
)
async def approve(
    deployment_id: str, request: Request, session: SessionDep, engine: EngineDep, principal: OperatorDep
) -> RolloutDetail:
    """Approve the next phase of a rollout awaiting approval; it starts at once."""
    await service.approve(session, deployment_id, actor=principal, request=request)
    await engine.step(deployment_id)
    return await service.detail(session, deployment_id)
