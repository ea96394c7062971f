"""API tokens for integrators and CI: created by an admin, shown once, stored hashed, scoped, revocable.

Format: `kx_<id>_<secret>`. The id finds the row; the secret is 256 random bits of which only
the SHA-256 is stored. A slow password hash (Argon2) exists to make guessing low-entropy human
passwords expensive; a 256-bit random secret cannot be guessed at any speed, so a fast hash is
as safe here and keeps every authenticated request cheap.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime, timedelta

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.apitokens.schemas import ApiTokenScope
from kernex.api.auth.schemas import Principal
from kernex.api.errors import NotFoundError, UnauthorizedError
from kernex.storage.models import ApiToken

TOKEN_PREFIX = "kx_"  # noqa: S105 - marks the format (and lets secret scanners spot leaks), not a secret
TOKEN_ID_BYTES = 8  # 16 hex characters: unique enough to address a row, not a secret
TOKEN_SECRET_BYTES = 32  # 256 bits from the OS CSPRNG
_TOKEN_RE = re.compile(r"^kx_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
# Recording every use would turn each read into a write; a minute's resolution answers "is it used?".
LAST_USED_RESOLUTION = timedelta(seconds=60)


def looks_like_api_token(token: str) -> bool:
    """True for the `kx_` format (anything else is tried as an access JWT)."""
    return token.startswith(TOKEN_PREFIX)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


async def create(
    session: AsyncSession, *, name: str, scope: ApiTokenScope, expires_in_days: int | None, created_by: str
) -> tuple[ApiToken, str]:
    """Store a new token; returns the row and the full token, which is not kept anywhere."""
    token_id = secrets.token_hex(TOKEN_ID_BYTES)
    secret = secrets.token_urlsafe(TOKEN_SECRET_BYTES)
    now = datetime.now(UTC)
    row = ApiToken(
        id=token_id,
        name=name,
        scope=scope.value,
        secret_sha256=_digest(secret),
        created_by=created_by,
        created_at=now,
        expires_at=now + timedelta(days=expires_in_days) if expires_in_days else None,
    )
    session.add(row)
    await session.commit()
    return row, f"{TOKEN_PREFIX}{token_id}_{secret}"


async def list_tokens(session: AsyncSession) -> list[ApiToken]:
    """Every token, newest first, revoked ones included (they explain past audit entries)."""
    rows = await session.exec(select(ApiToken).order_by(col(ApiToken.created_at).desc(), col(ApiToken.id)))
    return list(rows.all())


async def revoke(session: AsyncSession, token_id: str) -> ApiToken:
    """Revoke a token at once; revoking twice keeps the first time."""
    row = await session.get(ApiToken, token_id)
    if row is None:
        raise NotFoundError(f"API token {token_id} not found")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        await session.commit()
    return row


async def authenticate(session: AsyncSession, token: str) -> Principal:
    """The caller a `kx_` token stands for; UnauthorizedError if unknown, wrong, revoked or expired."""
    match = _TOKEN_RE.match(token)
    if match is None:
        raise UnauthorizedError("malformed API token")
    token_id, secret = match.groups()
    row = await session.get(ApiToken, token_id)
    # Compare digests in constant time even for an unknown id, so timing tells nothing.
    expected = row.secret_sha256 if row is not None else _digest("")
    if not hmac.compare_digest(expected, _digest(secret)) or row is None:
        raise UnauthorizedError("invalid API token")
    now = datetime.now(UTC)
    if row.revoked_at is not None:
        raise UnauthorizedError("API token revoked")
    if row.expires_at is not None and row.expires_at <= now:
        raise UnauthorizedError("API token expired")
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        row.last_used_at = now
        await session.commit()
    return Principal(kind="api_token", id=row.id, name=row.name, role=ApiTokenScope(row.scope).role)
