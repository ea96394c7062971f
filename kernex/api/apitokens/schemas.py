"""Bodies of the API-token domain."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kernex.api.auth.schemas import Role, StrictBody

# A token nobody expires stays valid until revoked; bounded so a typo cannot mean "forever and a day".
MAX_TOKEN_LIFETIME_DAYS = 3650


class ApiTokenScope(StrEnum):
    """What an API token may do; never admin (users and tokens are managed by people)."""

    READ = "read"
    OPERATOR = "operator"

    @property
    def role(self) -> Role:
        """The role a request with this token acts with."""
        return Role.VIEWER if self is ApiTokenScope.READ else Role.OPERATOR


class ApiTokenCreate(StrictBody):
    """A new token for an integrator or a CI job."""

    name: str = Field(min_length=1, max_length=128)
    scope: ApiTokenScope = ApiTokenScope.READ
    expires_in_days: int | None = Field(default=None, ge=1, le=MAX_TOKEN_LIFETIME_DAYS)

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable() or not value.strip():
            raise ValueError("name must be printable text")
        return value.strip()


class ApiTokenOut(BaseModel):
    """A token's metadata; the secret is never shown again after creation."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    scope: ApiTokenScope
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class ApiTokenCreated(ApiTokenOut):
    """The new token, with its secret shown this once."""

    token: str


class ApiTokenPage(BaseModel):
    """Tokens, newest first."""

    items: list[ApiTokenOut]
