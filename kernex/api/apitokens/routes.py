"""`/api/v1/tokens`: API tokens for integrators and CI (admins only)."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from kernex.api.apitokens import service
from kernex.api.apitokens.schemas import ApiTokenCreate, ApiTokenCreated, ApiTokenOut, ApiTokenPage
from kernex.api.audit import service as audit
from kernex.api.auth.deps import AdminDep
from kernex.api.deps import SessionDep

router = APIRouter(prefix="/api/v1/tokens", tags=["api tokens"])


@router.post(
    "", response_model=ApiTokenCreated, status_code=status.HTTP_201_CREATED, operation_id="createApiToken"
)
async def create_token(
    body: ApiTokenCreate, admin: AdminDep, request: Request, session: SessionDep
) -> ApiTokenCreated:
    """Create a token; its secret is in this response only."""
    row, token = await service.create(
        session,
        name=body.name,
        scope=body.scope,
        expires_in_days=body.expires_in_days,
        created_by=admin.actor,
    )
    await audit.record(
        session,
        actor=admin,
        action="token.create",
        target=f"api_token:{row.id}",
        outcome="success",
        request=request,
        details={"name": row.name, "scope": row.scope},
    )
    return ApiTokenCreated(**ApiTokenOut.model_validate(row).model_dump(), token=token)


@router.get("", response_model=ApiTokenPage, operation_id="listApiTokens")
async def list_tokens(_: AdminDep, session: SessionDep) -> ApiTokenPage:
    """Every token's metadata (never its secret), newest first."""
    return ApiTokenPage(items=[ApiTokenOut.model_validate(t) for t in await service.list_tokens(session)])


@router.delete("/{token_id}", response_model=ApiTokenOut, operation_id="revokeApiToken")
async def revoke_token(token_id: str, admin: AdminDep, request: Request, session: SessionDep) -> ApiTokenOut:
    """Revoke a token at once; it stays listed with its revocation time."""
    target = f"api_token:{token_id}"
    async with audit.recorded(session, actor=admin, action="token.revoke", target=target, request=request):
        row = await service.revoke(session, token_id)
    return ApiTokenOut.model_validate(row)
