"""`/api/v1/users`: operator accounts (admins only)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from kernex.api.audit import service as audit
from kernex.api.auth.deps import AdminDep
from kernex.api.auth.schemas import UserOut
from kernex.api.deps import SessionDep
from kernex.api.errors import ApiError
from kernex.api.users import service
from kernex.api.users.schemas import UserPage, UserUpdate

router = APIRouter(prefix="/api/v1/users", tags=["users"])


@router.get("", response_model=UserPage, operation_id="listUsers")
async def list_users(_: AdminDep, session: SessionDep) -> UserPage:
    """Every operator account."""
    return UserPage(items=[UserOut.model_validate(u) for u in await service.list_users(session)])


@router.get("/{user_id}", response_model=UserOut, operation_id="getUser")
async def get_user(user_id: str, _: AdminDep, session: SessionDep) -> UserOut:
    """One operator account."""
    return UserOut.model_validate(await service.get_user(session, user_id))


@router.patch("/{user_id}", response_model=UserOut, operation_id="updateUser")
async def update_user(
    user_id: str, body: UserUpdate, admin: AdminDep, request: Request, session: SessionDep
) -> UserOut:
    """Change a user's role or disable the account."""
    changes = body.model_dump(exclude_none=True, mode="json")
    try:
        user = await service.update_user(session, user_id, role=body.role, disabled=body.disabled)
    except ApiError as exc:
        await audit.record(
            session,
            actor=admin,
            action="user.update",
            target=f"user:{user_id}",
            outcome="failed",
            request=request,
            details={**changes, "error": exc.code},
        )
        raise
    await audit.record(
        session,
        actor=admin,
        action="user.update",
        target=f"user:{user.username}",
        outcome="success",
        request=request,
        details=changes,
    )
    return UserOut.model_validate(user)
