"""Operator accounts: listing, role changes, disabling; never leaves the fleet without an admin."""

from __future__ import annotations

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.auth.schemas import Role
from kernex.api.auth.service import count_admins
from kernex.api.errors import ConflictError, NotFoundError
from kernex.storage.models import User


async def list_users(session: AsyncSession) -> list[User]:
    """Every account, oldest first."""
    rows = await session.exec(select(User).order_by(col(User.created_at), col(User.id)))
    return list(rows.all())


async def get_user(session: AsyncSession, user_id: str) -> User:
    """One account, or NotFoundError."""
    user = await session.get(User, user_id)
    if user is None:
        raise NotFoundError(f"user {user_id} not found")
    return user


async def update_user(
    session: AsyncSession, user_id: str, *, role: Role | None, disabled: bool | None
) -> User:
    """Apply a role change or (dis)abling; disabling revokes every token the user holds."""
    user = await get_user(session, user_id)
    loses_admin = (
        user.role == Role.ADMIN.value
        and not user.disabled
        and ((role is not None and role is not Role.ADMIN) or disabled is True)
    )
    if loses_admin and await count_admins(session) <= 1:
        raise ConflictError("this is the last enabled admin: promote another user first")
    if role is not None:
        user.role = role.value
    if disabled is not None and disabled != user.disabled:
        user.disabled = disabled
        # Access tokens are checked against the user row on every request, but bumping the
        # version also keeps them dead if the account is enabled again.
        user.token_version += 1
    await session.commit()
    return user
