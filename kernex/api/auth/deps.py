"""Who is calling: operator credentials (access token or API token) and device-signed JWTs.

Operator routes take `ViewerDep`, `OperatorDep` or `AdminDep` (at least that role); device
routes take `DeviceDep`. Each kind of credential is refused where the other belongs: an access
token or API token never authenticates a device, and a device JWT never authenticates an operator.
Missing or bad credentials answer 401 with `WWW-Authenticate: Bearer`; too low a role answers 403.
"""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kernex.api.apitokens import service as apitokens
from kernex.api.audit import service as audit
from kernex.api.auth import service
from kernex.api.auth.schemas import Principal, Role
from kernex.api.auth.tokens import AccessClaims
from kernex.api.deps import SessionDep, StateDep
from kernex.api.errors import ForbiddenError, UnauthorizedError

__all__ = [
    "AccessClaimsDep",
    "AdminDep",
    "AdminOrBootstrapDep",
    "DeviceDep",
    "OperatorDep",
    "Principal",
    "Role",
    "ViewerDep",
]

# Reads change nothing, so a refused read is not an audit event (it is logged); a refused write is.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_operator_bearer = HTTPBearer(
    scheme_name="operator",
    description="An access token from POST /api/v1/auth/login, or an API token (`kx_...`).",
    auto_error=False,
)
_device_bearer = HTTPBearer(
    scheme_name="device",
    description="A JWT the device signs with its own key (aud `kernex-api`, at most 5 minutes).",
    auto_error=False,
)


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise UnauthorizedError(
            "authentication required: send Authorization: Bearer <token>", token_given=False
        )
    return credentials.credentials


async def _authenticate(
    request: Request,
    session: SessionDep,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_operator_bearer)],
) -> tuple[Principal, AccessClaims | None]:
    token = _token(credentials)
    claims: AccessClaims | None = None
    if apitokens.looks_like_api_token(token):
        principal = await apitokens.authenticate(session, token)
    else:
        principal, claims = await service.authenticate_access_token(session, state.jwt_secret, token)
    request.state.principal = principal
    structlog.contextvars.bind_contextvars(actor=principal.actor)
    return principal, claims


_AuthenticatedDep = Annotated[tuple[Principal, AccessClaims | None], Depends(_authenticate)]


async def _require(
    role: Role, authenticated: tuple[Principal, AccessClaims | None], request: Request, session: SessionDep
) -> Principal:
    principal = authenticated[0]
    if principal.role.includes(role):
        return principal
    if request.method not in SAFE_METHODS:
        route = getattr(request.scope.get("route"), "path", request.url.path)
        await audit.record(
            session,
            actor=principal,
            action=f"{request.method} {route}",
            target=request.url.path,
            outcome="denied",
            request=request,
            details={"required_role": role.value, "role": principal.role.value},
        )
    raise ForbiddenError(f"this needs the {role.value} role; the caller has {principal.role.value}")


async def require_viewer(
    authenticated: _AuthenticatedDep, request: Request, session: SessionDep
) -> Principal:
    """Any authenticated operator-side caller."""
    return await _require(Role.VIEWER, authenticated, request, session)


async def require_operator(
    authenticated: _AuthenticatedDep, request: Request, session: SessionDep
) -> Principal:
    """An operator or admin (bundles, deployments, config, rollback)."""
    return await _require(Role.OPERATOR, authenticated, request, session)


async def require_admin(authenticated: _AuthenticatedDep, request: Request, session: SessionDep) -> Principal:
    """An admin (users, tokens, the audit log)."""
    return await _require(Role.ADMIN, authenticated, request, session)


async def require_admin_unless_bootstrap(
    request: Request,
    session: SessionDep,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_operator_bearer)],
) -> Principal | None:
    """None while no admin exists (the first account may be created in development); an admin after."""
    if await service.count_admins(session) == 0:
        if state.settings.is_production:
            raise ForbiddenError("no admin exists: create the first one with `kernex users create-admin`")
        return None
    authenticated = await _authenticate(request, session, state, credentials)
    return await _require(Role.ADMIN, authenticated, request, session)


async def access_claims(authenticated: _AuthenticatedDep) -> AccessClaims:
    """The caller's access-token claims; API tokens have none (they are revoked by id, not logged out)."""
    claims = authenticated[1]
    if claims is None:
        raise ForbiddenError("this needs a user's access token, not an API token")
    return claims


async def require_device(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_device_bearer)],
) -> str:
    """The id of the active device that signed the bearer JWT."""
    token = _token(credentials)
    if apitokens.looks_like_api_token(token):
        raise UnauthorizedError("device endpoints accept only device-signed tokens")
    device_id = await service.authenticate_device(session, token)
    structlog.contextvars.bind_contextvars(device_id=device_id)
    return device_id


ViewerDep = Annotated[Principal, Depends(require_viewer)]
OperatorDep = Annotated[Principal, Depends(require_operator)]
AdminDep = Annotated[Principal, Depends(require_admin)]
AccessClaimsDep = Annotated[AccessClaims, Depends(access_claims)]
DeviceDep = Annotated[str, Depends(require_device)]
AdminOrBootstrapDep = Annotated[Principal | None, Depends(require_admin_unless_bootstrap)]
