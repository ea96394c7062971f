"""Bodies of the API-token domain."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from kernex.api.auth.schemas import Role, StrictBody

# A token nobody expires stays valid until revoked; bounded so a typo cannot mean "forever and a day".
MAX_TOKEN_LIFETIME_DAYS = 3650
_VISIBLE = r"[^\x00-\x20\x7f-\xa0]"
NAME_PATTERN = rf"^{_VISIBLE}(?:[^\x00-\x1f\x7f-\x9f]*{_VISIBLE})?$"


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

    # Shown in listings and the audit log: no control characters, no surrounding blanks.
    name: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)
    scope: ApiTokenScope = ApiTokenScope.READ
    expires_in_days: int | None = Field(default=None, ge=1, le=MAX_TOKEN_LIFETIME_DAYS)


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
