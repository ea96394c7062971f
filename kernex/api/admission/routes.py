"""`/api/v1/enrollment-tokens` and `/api/v1/preauthorizations`: how devices are admitted (operators)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, status

from kernex.api.admission import service
from kernex.api.admission.schemas import (
    EnrollmentTokenCreate,
    EnrollmentTokenCreated,
    EnrollmentTokenOut,
    EnrollmentTokenPage,
    PreauthorizationCreate,
    PreauthorizationOut,
    PreauthorizationPage,
)
from kernex.api.audit import service as audit
from kernex.api.auth.deps import OperatorDep, require_operator
from kernex.api.deps import SessionDep, SettingsDep

# Listing tokens shows who may enroll devices: operators, like creating them.
tokens_router = APIRouter(
    prefix="/api/v1/enrollment-tokens", tags=["admission"], dependencies=[Depends(require_operator)]
)
preauth_router = APIRouter(
    prefix="/api/v1/preauthorizations", tags=["admission"], dependencies=[Depends(require_operator)]
)


@tokens_router.post(
    "",
    response_model=EnrollmentTokenCreated,
    status_code=status.HTTP_201_CREATED,
    operation_id="createEnrollmentToken",
)
async def create_token(
    body: EnrollmentTokenCreate,
    operator: OperatorDep,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
) -> EnrollmentTokenCreated:
    """Create an enrollment token; its secret is in this response only."""
    row, token = await service.create_token(
        session,
        name=body.name,
        tags=body.tags,
        max_uses=body.max_uses,
        expires_in_days=body.expires_in_days or settings.enrollment_token_default_ttl_days,
        created_by=operator.actor,
    )
    await audit.record(
        session,
        actor=operator,
        action="enrollment_token.create",
        target=f"enrollment_token:{row.id}",
        outcome="success",
        request=request,
        details={"name": row.name, "tags": row.tags, "max_uses": row.max_uses},
    )
    return EnrollmentTokenCreated(**EnrollmentTokenOut.model_validate(row).model_dump(), token=token)


@tokens_router.get("", response_model=EnrollmentTokenPage, operation_id="listEnrollmentTokens")
async def list_tokens(session: SessionDep) -> EnrollmentTokenPage:
    """Every enrollment token's metadata (never its secret), newest first."""
    rows = await service.list_tokens(session)
    return EnrollmentTokenPage(items=[EnrollmentTokenOut.model_validate(r) for r in rows])


@tokens_router.delete("/{token_id}", response_model=EnrollmentTokenOut, operation_id="revokeEnrollmentToken")
async def revoke_token(
    token_id: str, operator: OperatorDep, request: Request, session: SessionDep
) -> EnrollmentTokenOut:
    """Revoke a token at once: devices presenting it from now on wait pending."""
    target = f"enrollment_token:{token_id}"
    async with audit.recorded(
        session, actor=operator, action="enrollment_token.revoke", target=target, request=request
    ):
        row = await service.revoke_token(session, token_id)
    return EnrollmentTokenOut.model_validate(row)


@preauth_router.post(
    "",
    response_model=PreauthorizationOut,
    status_code=status.HTTP_201_CREATED,
    operation_id="preauthorizeDevice",
)
async def preauthorize(
    body: PreauthorizationCreate, operator: OperatorDep, request: Request, session: SessionDep
) -> PreauthorizationOut:
    """Admit a device's key before its first contact (any admission policy)."""
    fingerprint = service.fingerprint_of(
        key_fingerprint=body.key_fingerprint, public_key_pem=body.public_key_pem, csr=body.csr
    )
    target = f"preauthorization:{fingerprint}"
    async with audit.recorded(
        session, actor=operator, action="device.preauthorize", target=target, request=request
    ) as details:
        row = await service.preauthorize(
            session, key_fingerprint=fingerprint, name=body.name, tags=body.tags, created_by=operator.actor
        )
        details.update({"name": row.name, "tags": row.tags})
    return PreauthorizationOut.model_validate(row)


@preauth_router.get("", response_model=PreauthorizationPage, operation_id="listPreauthorizations")
async def list_preauthorizations(session: SessionDep) -> PreauthorizationPage:
    """Every pre-authorized key, newest first, with the device it admitted."""
    rows = await service.list_preauthorizations(session)
    return PreauthorizationPage(items=[PreauthorizationOut.model_validate(r) for r in rows])


@preauth_router.delete(
    "/{key_fingerprint}", response_model=PreauthorizationOut, operation_id="deletePreauthorization"
)
async def delete_preauthorization(
    key_fingerprint: str, operator: OperatorDep, request: Request, session: SessionDep
) -> PreauthorizationOut:
    """Withdraw a pre-authorization; a device it already admitted stays admitted."""
    target = f"preauthorization:{key_fingerprint}"
    async with audit.recorded(
        session, actor=operator, action="device.preauthorization.delete", target=target, request=request
    ):
        row = await service.delete_preauthorization(session, key_fingerprint)
    return PreauthorizationOut.model_validate(row)
