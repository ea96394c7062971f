"""Admission (DESIGN.md "Admission policy"): enrollment tokens, pre-authorized keys, the decision.

An enrollment token is `kxe_<id>_<secret>`: the id finds the row, the secret is 256 random bits
of which only the SHA-256 is stored (a fast hash suffices for a secret nobody can guess, as for
API tokens). A use is taken with one conditional UPDATE, so concurrent registrations can never
take more than `max_uses` between them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.errors import ConflictError, NotFoundError
from kernex.api.settings import AdmissionPolicy
from kernex.kit.logs import get_logger
from kernex.protocol.exceptions import InvalidKeyError
from kernex.protocol.keys import load_csr, load_public_key_pem, public_key_fingerprint
from kernex.storage.models import AdmissionState, DevicePreauthorization, EnrollmentToken

log = get_logger(__name__)

TOKEN_PREFIX = "kxe_"  # noqa: S105 - marks the format (and lets secret scanners spot leaks), not a secret
TOKEN_ID_BYTES = 8  # 16 hex characters: unique enough to address a row, not a secret
TOKEN_SECRET_BYTES = 32  # 256 bits from the OS CSPRNG
_TOKENS: sa.Table = EnrollmentToken.__table__  # type: ignore[attr-defined]  # SQLModel sets it at class creation
_TOKEN_RE = re.compile(r"^kxe_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class Admission:
    """What a first registration gets: its state, its tags, and why (for the log and audit)."""

    state: AdmissionState
    reason: str
    tags: list[str] = field(default_factory=list)
    name: str | None = None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


async def create_token(
    session: AsyncSession,
    *,
    name: str,
    tags: list[str],
    max_uses: int | None,
    expires_in_days: int,
    created_by: str,
) -> tuple[EnrollmentToken, str]:
    """Store a new enrollment token; returns the row and the full token, kept nowhere else."""
    token_id = secrets.token_hex(TOKEN_ID_BYTES)
    secret = secrets.token_urlsafe(TOKEN_SECRET_BYTES)
    now = datetime.now(UTC)
    row = EnrollmentToken(
        id=token_id,
        name=name,
        secret_sha256=_digest(secret),
        tags=sorted(set(tags)),
        max_uses=max_uses,
        expires_at=now + timedelta(days=expires_in_days),
        created_by=created_by,
        created_at=now,
    )
    session.add(row)
    await session.commit()
    return row, f"{TOKEN_PREFIX}{token_id}_{secret}"


async def list_tokens(session: AsyncSession) -> list[EnrollmentToken]:
    """Every enrollment token, newest first (revoked and used-up ones too: they explain admissions)."""
    rows = await session.exec(
        select(EnrollmentToken).order_by(col(EnrollmentToken.created_at).desc(), col(EnrollmentToken.id))
    )
    return list(rows.all())


async def revoke_token(session: AsyncSession, token_id: str) -> EnrollmentToken:
    """Revoke a token at once; revoking twice keeps the first time."""
    row = await session.get(EnrollmentToken, token_id)
    if row is None:
        raise NotFoundError(f"enrollment token {token_id} not found")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        await session.commit()
    return row


async def take_token_use(session: AsyncSession, token: str) -> EnrollmentToken | None:
    """Take one use of a valid token (in the session's transaction); None when it admits nothing.

    Unknown, wrong secret, revoked, expired and used-up tokens all answer None: the device then
    waits pending like one that sent no token, and learns nothing about which it was.
    """
    match = _TOKEN_RE.fullmatch(token)
    if match is None:
        return None
    token_id, secret = match.groups()
    row = await session.get(EnrollmentToken, token_id)
    if row is None or not hmac.compare_digest(row.secret_sha256, _digest(secret)):
        return None
    now = datetime.now(UTC)
    table = _TOKENS
    # One statement decides and counts, so two devices racing for the last use cannot both win.
    connection = await session.connection()
    taken = await connection.execute(
        sa.update(table)
        .where(
            table.c.id == token_id,
            table.c.revoked_at.is_(None),
            sa.or_(table.c.expires_at.is_(None), table.c.expires_at > now),
            sa.or_(table.c.max_uses.is_(None), table.c.uses < table.c.max_uses),
        )
        .values(uses=table.c.uses + 1, last_used_at=now)
    )
    if taken.rowcount != 1:
        log.info("enrollment token refused", token_id=token_id)
        return None
    await session.refresh(row)
    return row


def fingerprint_of(*, key_fingerprint: str | None, public_key_pem: str | None, csr: str | None) -> str:
    """The key fingerprint named by exactly one of the three (the schema enforces one)."""
    if key_fingerprint is not None:
        return key_fingerprint
    if public_key_pem is not None:
        if not public_key_pem.isascii():
            raise InvalidKeyError("a PEM public key is ASCII text")
        return public_key_fingerprint(load_public_key_pem(public_key_pem))
    if csr is None:
        raise ValueError("no key given")
    return public_key_fingerprint(load_csr(csr)[1])


async def preauthorize(
    session: AsyncSession, *, key_fingerprint: str, name: str | None, tags: list[str], created_by: str
) -> DevicePreauthorization:
    """Admit the key on its first contact; ConflictError when it is already pre-authorized."""
    if await session.get(DevicePreauthorization, key_fingerprint) is not None:
        raise ConflictError(f"the key {key_fingerprint} is already pre-authorized")
    row = DevicePreauthorization(
        key_fingerprint=key_fingerprint, name=name, tags=sorted(set(tags)), created_by=created_by
    )
    session.add(row)
    try:
        await session.commit()
    except sa.exc.IntegrityError:
        await session.rollback()
        raise ConflictError(f"the key {key_fingerprint} is already pre-authorized") from None
    return row


async def list_preauthorizations(session: AsyncSession) -> list[DevicePreauthorization]:
    """Every pre-authorization, newest first."""
    rows = await session.exec(
        select(DevicePreauthorization).order_by(
            col(DevicePreauthorization.created_at).desc(), col(DevicePreauthorization.key_fingerprint)
        )
    )
    return list(rows.all())


async def delete_preauthorization(session: AsyncSession, key_fingerprint: str) -> DevicePreauthorization:
    """Withdraw a pre-authorization (a device it already admitted stays admitted)."""
    row = await session.get(DevicePreauthorization, key_fingerprint)
    if row is None:
        raise NotFoundError(f"no pre-authorization for the key {key_fingerprint}")
    await session.delete(row)
    await session.commit()
    return row


async def decide(
    session: AsyncSession,
    policy: AdmissionPolicy,
    *,
    key_fingerprint: str,
    device_id: str,
    token: str | None,
) -> Admission:
    """The admission of a key registering for the first time, or of a pending device registering again.

    Changes are made in the session's transaction, committed with the device row.
    """
    preauth = await session.get(DevicePreauthorization, key_fingerprint)
    if preauth is not None and preauth.used_at is None:
        preauth.used_at = datetime.now(UTC)
        preauth.device_id = device_id
        session.add(preauth)
        return Admission(AdmissionState.ACTIVE, "pre-authorized", list(preauth.tags), preauth.name)
    if policy is AdmissionPolicy.AUTO:
        return Admission(AdmissionState.ACTIVE, "auto")
    if policy is AdmissionPolicy.TOKEN and token is not None:
        row = await take_token_use(session, token)
        if row is not None:
            return Admission(AdmissionState.ACTIVE, f"enrollment token {row.id}", list(row.tags))
        return Admission(AdmissionState.PENDING, "invalid enrollment token")
    return Admission(AdmissionState.PENDING, "awaiting an operator" if token is None else "token ignored")
