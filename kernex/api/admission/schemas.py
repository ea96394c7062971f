"""Bodies of the admission domain: enrollment tokens and pre-authorized device keys."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from kernex.api.apitokens.schemas import NAME_PATTERN
from kernex.api.auth.schemas import StrictBody

MAX_ENROLLMENT_TOKEN_DAYS = 365  # a token outliving a year of installs is a standing credential
MAX_TOKEN_USES = 1_000_000
Tag = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]
Tags = Annotated[list[Tag], Field(max_length=32)]
KEY_FIELDS = ("key_fingerprint", "public_key_pem", "csr")
Fingerprint = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class EnrollmentTokenCreate(StrictBody):
    """A token installers give devices; every device it admits gets its tags."""

    name: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)
    tags: Tags = Field(default_factory=list)
    max_uses: int | None = Field(default=None, ge=1, le=MAX_TOKEN_USES)
    # Unset: the server's KERNEX_ENROLLMENT_TOKEN_DEFAULT_TTL_DAYS.
    expires_in_days: int | None = Field(default=None, ge=1, le=MAX_ENROLLMENT_TOKEN_DAYS)


class EnrollmentTokenOut(BaseModel):
    """A token's metadata; its secret is shown once, at creation."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    tags: list[str]
    max_uses: int | None
    uses: int
    expires_at: datetime | None
    created_by: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class EnrollmentTokenCreated(EnrollmentTokenOut):
    """The new token, with the secret the device sends (`kxe_...`)."""

    token: str


class EnrollmentTokenPage(BaseModel):
    """Every enrollment token, newest first."""

    items: list[EnrollmentTokenOut]


def _one_key_schema(schema: dict[str, Any]) -> None:
    # The schema says what the validator enforces: exactly one of the three, not null.
    properties = schema["properties"]
    for name in KEY_FIELDS:
        prop = properties[name]
        variants = [v for v in prop.pop("anyOf", []) if v.get("type") != "null"]
        if variants:
            prop.update(variants[0])
        prop.pop("default", None)
    schema["oneOf"] = [{"required": [name]} for name in KEY_FIELDS]


class PreauthorizationCreate(StrictBody):
    """Admit a device on first contact: name its key by fingerprint, public key or CSR (exactly one)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_key_schema)

    key_fingerprint: Fingerprint | None = Field(
        default=None, description="SHA-256 of the DER SubjectPublicKeyInfo, lowercase hex"
    )
    public_key_pem: str | None = Field(default=None, min_length=1, max_length=16_384)
    csr: str | None = Field(default=None, min_length=1, max_length=16_384)
    name: str | None = Field(default=None, min_length=1, max_length=128, pattern=NAME_PATTERN)
    tags: Tags = Field(default_factory=list)

    @model_validator(mode="after")
    def _exactly_one_key(self) -> PreauthorizationCreate:
        given = [v for v in (self.key_fingerprint, self.public_key_pem, self.csr) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of key_fingerprint, public_key_pem and csr")
        return self


class PreauthorizationOut(BaseModel):
    """A pre-authorized key, and the device it admitted once it registered."""

    model_config = ConfigDict(from_attributes=True)

    key_fingerprint: str
    device_id: str | None
    name: str | None
    tags: list[str]
    created_by: str
    created_at: datetime
    used_at: datetime | None


class PreauthorizationPage(BaseModel):
    """Every pre-authorization, newest first."""

    items: list[PreauthorizationOut]
