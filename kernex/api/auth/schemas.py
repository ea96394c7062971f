"""Roles, the authenticated caller, and the bodies of the auth domain."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# NIST SP 800-63B asks for at least 8; operators guard a whole fleet, so 12.
PASSWORD_MIN_CHARS = 12
# Bounds the work one login does; no passphrase needs more.
PASSWORD_MAX_CHARS = 256
USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{2,127}$"


class Role(StrEnum):
    """What an operator may do: admin ⊇ operator ⊇ viewer."""

    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"

    @property
    def rank(self) -> int:
        """Higher ranks include every right of lower ones."""
        return _RANKS[self]

    def includes(self, other: Role) -> bool:
        """True when this role has at least other's rights."""
        return self.rank >= other.rank


_RANKS = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}

PrincipalKind = Literal["user", "api_token"]


@dataclass(frozen=True)
class Principal:
    """An authenticated operator-side caller: a user (access token) or an API token."""

    kind: PrincipalKind
    id: str
    name: str
    role: Role

    @property
    def actor(self) -> str:
        """How the audit log names this caller: usernames are unique, token names are not (the id is)."""
        if self.kind == "api_token":
            return f"api_token:{self.id}:{self.name}"
        return f"user:{self.name}"


class StrictBody(BaseModel):
    """Request bodies refuse unknown fields: a typo is an error, not a silently ignored option."""

    model_config = ConfigDict(extra="forbid")


class LoginRequest(StrictBody):
    """Username and password."""

    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=PASSWORD_MAX_CHARS)


class TokenResponse(BaseModel):
    """An OAuth2-style bearer token answer."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 token type name, not a secret
    expires_in: int
    expires_at: datetime


class RegisterRequest(StrictBody):
    """A new operator account."""

    username: str = Field(pattern=USERNAME_PATTERN)
    password: str = Field(min_length=PASSWORD_MIN_CHARS, max_length=PASSWORD_MAX_CHARS)
    role: Role = Role.VIEWER


class PasswordChange(StrictBody):
    """The current password proves it is the account holder, not someone at an unlocked screen."""

    current_password: str = Field(min_length=1, max_length=PASSWORD_MAX_CHARS)
    new_password: str = Field(min_length=PASSWORD_MIN_CHARS, max_length=PASSWORD_MAX_CHARS)


class UserOut(BaseModel):
    """An operator account, without its password hash."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    username: str
    role: Role
    disabled: bool
    created_at: datetime


class PrincipalOut(BaseModel):
    """Who the caller is."""

    kind: PrincipalKind
    id: str
    name: str
    role: Role
