"""`/api/v1/auth`: accounts, login, logout and who-am-I."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status

from kernex.api.audit import service as audit
from kernex.api.auth import service
from kernex.api.auth.deps import AccessClaimsDep, AdminOrBootstrapDep, ViewerDep
from kernex.api.auth.schemas import (
    LoginRequest,
    PasswordChange,
    PrincipalOut,
    RegisterRequest,
    Role,
    TokenResponse,
    UserOut,
)
from kernex.api.clients import client_address
from kernex.api.deps import SessionDep, StateDep
from kernex.kit.logs import get_logger

log = get_logger(__name__)

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])

_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing, invalid, expired or revoked credentials"}
}


@router.post(
    "/register",
    response_model=UserOut,
    status_code=status.HTTP_201_CREATED,
    operation_id="registerUser",
    responses={**_UNAUTHORIZED, 403: {"description": "Not an admin"}, 409: {"description": "Name taken"}},
)
async def register_user(
    body: RegisterRequest, request: Request, session: SessionDep, admin: AdminOrBootstrapDep
) -> UserOut:
    """Create an operator account (admins only; while no admin exists, the first account becomes admin)."""
    role = body.role if admin is not None else Role.ADMIN
    actor = admin if admin is not None else f"bootstrap:{body.username}"
    target = f"user:{body.username}"
    async with audit.recorded(
        session, actor=actor, action="user.register", target=target, request=request
    ) as details:
        user = await service.create_user(session, username=body.username, role=role, password=body.password)
        details.update({"role": role.value, "user_id": user.id})
    return UserOut.model_validate(user)


@router.post(
    "/login",
    response_model=TokenResponse,
    operation_id="login",
    responses={**_UNAUTHORIZED, 429: {"description": "Too many attempts; see Retry-After"}},
)
async def login(body: LoginRequest, request: Request, session: SessionDep, state: StateDep) -> TokenResponse:
    """Exchange a username and password for an access token."""
    state.limits.check_login(client_address(request), body.username)
    target = f"user:{body.username}"
    async with audit.audited(
        session, actor="anonymous", action="auth.login", target=target, request=request, refused="denied"
    ):
        issued = await service.login(
            session,
            secret=state.jwt_secret,
            ttl_s=state.settings.access_token_ttl_s,
            username=body.username,
            password=body.password,
        )
    await audit.record(
        session, actor=target, action="auth.login", target=target, outcome="success", request=request
    )
    return TokenResponse(
        access_token=issued.token,
        expires_in=state.settings.access_token_ttl_s,
        expires_at=issued.expires_at,
    )


@router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="logout",
    responses={**_UNAUTHORIZED, 403: {"description": "Called with an API token"}},
)
async def logout(
    principal: ViewerDep, claims: AccessClaimsDep, request: Request, session: SessionDep
) -> Response:
    """Revoke the access token this request carries."""
    await service.logout(session, claims)
    await audit.record(
        session,
        actor=principal,
        action="auth.logout",
        target=f"user:{principal.name}",
        outcome="success",
        request=request,
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/logout-all",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="logoutEverywhere",
    responses={**_UNAUTHORIZED, 403: {"description": "Called with an API token"}},
)
async def logout_everywhere(
    principal: ViewerDep, claims: AccessClaimsDep, request: Request, session: SessionDep
) -> Response:
    """Revoke every access token issued to the caller so far."""
    await service.revoke_all_sessions_of(session, claims.user_id)
    await audit.record(
        session,
        actor=principal,
        action="auth.logout_all",
        target=f"user:{principal.name}",
        outcome="success",
        request=request,
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/password",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="changePassword",
    responses={**_UNAUTHORIZED, 403: {"description": "Wrong current password, or an API token"}},
)
async def change_password(
    body: PasswordChange, principal: ViewerDep, claims: AccessClaimsDep, request: Request, session: SessionDep
) -> Response:
    """Change the caller's password; every existing access token stops working."""
    target = f"user:{principal.name}"
    async with audit.recorded(
        session, actor=principal, action="auth.password", target=target, request=request, refused="denied"
    ):
        await service.change_password(
            session, claims.user_id, current=body.current_password, new=body.new_password
        )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/me", response_model=PrincipalOut, operation_id="whoAmI", responses=_UNAUTHORIZED)
async def who_am_i(principal: ViewerDep) -> PrincipalOut:
    """The authenticated caller: a user or an API token, and its role."""
    return PrincipalOut(kind=principal.kind, id=principal.id, name=principal.name, role=principal.role)
