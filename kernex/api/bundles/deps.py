"""Who may download: a device (device-signed JWT) or an operator-side caller (access or API token)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import jwt
import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kernex.api.apitokens import service as apitokens
from kernex.api.auth import service as auth
from kernex.api.auth.schemas import Principal
from kernex.api.deps import SessionDep, StateDep
from kernex.api.errors import UnauthorizedError
from kernex.protocol.devicetoken import DEVICE_TOKEN_TYP

_bearer = HTTPBearer(
    scheme_name="device or operator",
    description="A device-signed JWT (devices), or an access token / `kx_` API token (operators).",
    auto_error=False,
)


@dataclass(frozen=True)
class Caller:
    """Either a device or an operator-side principal."""

    device_id: str | None = None
    principal: Principal | None = None

    @property
    def actor(self) -> str:
        """How logs and the audit log name the caller."""
        if self.principal is not None:
            return self.principal.actor
        return f"device:{self.device_id}"


def _is_device_token(token: str) -> bool:
    try:
        return jwt.get_unverified_header(token).get("typ") == DEVICE_TOKEN_TYP
    except jwt.PyJWTError:
        return False  # not a JWT at all: the operator path refuses it with its own message


async def download_caller(
    request: Request,
    session: SessionDep,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """Authenticate a device or an operator; each kind by its own verifier, never the other's."""
    if credentials is None or not credentials.credentials:
        raise UnauthorizedError(
            "authentication required: send Authorization: Bearer <token>", token_given=False
        )
    token = credentials.credentials
    if apitokens.looks_like_api_token(token):
        principal = await apitokens.authenticate(session, token)
    elif _is_device_token(token):
        device_id = await auth.authenticate_device(session, token)
        structlog.contextvars.bind_contextvars(device_id=device_id)
        return Caller(device_id=device_id)
    else:
        principal, _claims = await auth.authenticate_access_token(session, state.jwt_secret, token)
    request.state.principal = principal
    structlog.contextvars.bind_contextvars(actor=principal.actor)
    return Caller(principal=principal)


DownloadCallerDep = Annotated[Caller, Depends(download_caller)]
