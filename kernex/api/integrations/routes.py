"""`/api/v1/integrations`: integrator credentials for the fleet topics (admins, audited)."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from kernex.api.audit import service as audit
from kernex.api.auth.deps import AdminDep
from kernex.api.deps import PKIDep, SessionDep, SettingsDep
from kernex.api.integrations import service
from kernex.api.integrations.schemas import (
    IntegrationCreate,
    IntegrationCreated,
    IntegrationOut,
    IntegrationPage,
    IntegrationRevoked,
)
from kernex.protocol.fleet import fleet_filter
from kernex.protocol.topics import Topics

router = APIRouter(prefix="/api/v1/integrations", tags=["integrations"])


@router.post(
    "",
    response_model=IntegrationCreated,
    status_code=status.HTTP_201_CREATED,
    operation_id="createIntegration",
    responses={409: {"description": "An active integrator has that name"}},
)
async def create_integration(
    body: IntegrationCreate,
    admin: AdminDep,
    pki: PKIDep,
    settings: SettingsDep,
    request: Request,
    session: SessionDep,
) -> IntegrationCreated:
    """Issue an integrator certificate that may only read the fleet topics; its key is in this answer only."""
    target = f"integration:{body.name}"
    async with audit.recorded(
        session, actor=admin, action="integration.create", target=target, request=request
    ) as details:
        issued, outcome = await service.create(pki, settings, body.name)
        details.update({"serial": issued.integrator.serial, "broker_reloaded": outcome.reloaded})
    return IntegrationCreated(
        **IntegrationOut.of(issued.integrator).model_dump(),
        certificate_pem=issued.certificate_pem,
        private_key_pem=issued.private_key_pem.decode("ascii"),
        ca_certificate_pem=pki.ca_certificate_pem,
        subscribe=fleet_filter(Topics(settings.topic_prefix)),
        broker_reloaded=outcome.reloaded,
        errors=list(outcome.errors),
    )


@router.get("", response_model=IntegrationPage, operation_id="listIntegrations")
async def list_integrations(_: AdminDep, pki: PKIDep) -> IntegrationPage:
    """Every integrator, revoked ones included, by name."""
    return IntegrationPage(items=[IntegrationOut.of(i) for i in await service.list_integrations(pki)])


@router.post("/{name}/revoke", response_model=IntegrationRevoked, operation_id="revokeIntegration")
async def revoke_integration(
    name: str, admin: AdminDep, pki: PKIDep, settings: SettingsDep, request: Request, session: SessionDep
) -> IntegrationRevoked:
    """Take the integrator out of the ACL and put its certificate in the fleet CRL; reload the broker."""
    target = f"integration:{name}"
    async with audit.recorded(
        session, actor=admin, action="integration.revoke", target=target, request=request
    ) as details:
        revoked, outcome = await service.revoke(pki, settings, name)
        details.update({"serial": revoked.serial, "broker_reloaded": outcome.reloaded})
    return IntegrationRevoked(
        **IntegrationOut.of(revoked).model_dump(),
        broker_reloaded=outcome.reloaded,
        errors=list(outcome.errors),
    )
