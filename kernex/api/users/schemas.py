"""Bodies of the users domain (accounts are created through /api/v1/auth/register)."""

from __future__ import annotations

from pydantic import BaseModel

from kernex.api.auth.schemas import Role, StrictBody, UserOut


class UserUpdate(StrictBody):
    """Change a user's role or disable the account; omitted fields stay as they are."""

    role: Role | None = None
    disabled: bool | None = None


class UserPage(BaseModel):
    """Every account, oldest first."""

    items: list[UserOut]
