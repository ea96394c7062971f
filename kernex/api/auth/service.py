"""Passwords, logins, access-token checks and device-token checks; knows nothing of HTTP.

Passwords are hashed with Argon2id at OWASP's recommended minimum (19 MiB, 2 passes, 1 lane);
bcrypt hashes imported from another system are accepted and upgraded to Argon2id at the next
successful login.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime

import argon2
import bcrypt
import jwt
import sqlalchemy as sa
from sqlmodel import col, delete, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.auth import tokens
from kernex.api.auth.schemas import Principal, Role
from kernex.api.errors import ApiError, ConflictError, ForbiddenError, UnauthorizedError
from kernex.protocol import devicetoken
from kernex.protocol.exceptions import InvalidKeyError, SignatureError
from kernex.protocol.keys import PublicKey, load_public_key_pem
from kernex.storage.models import AdmissionState, Device, RevokedAccessToken, User

# OWASP Password Storage Cheat Sheet, Argon2id: m=19 MiB, t=2, p=1.
ARGON2_MEMORY_KIB = 19 * 1024
ARGON2_TIME_COST = 2
ARGON2_PARALLELISM = 1
_hasher = argon2.PasswordHasher(
    time_cost=ARGON2_TIME_COST,
    memory_cost=ARGON2_MEMORY_KIB,
    parallelism=ARGON2_PARALLELISM,
    type=argon2.Type.ID,
)
_BCRYPT_RE = re.compile(r"^\$2[aby]\$\d{2}\$[./A-Za-z0-9]{53}$")
# A login for an unknown user verifies against this, so its timing matches a wrong password.
_DUMMY_HASH = _hasher.hash("kernex-timing-equaliser")
INVALID_LOGIN = "invalid username or password"  # one message: never tell which of the two was wrong


def hash_password(password: str) -> str:
    """An Argon2id hash (blocking: tens of milliseconds by design)."""
    return _hasher.hash(password)


def check_password_hash(password_hash: str) -> str:
    """Accept an Argon2id or bcrypt hash for import; InvalidPasswordHash otherwise."""
    if _BCRYPT_RE.match(password_hash):
        return password_hash
    try:
        if argon2.extract_parameters(password_hash).type is argon2.Type.ID:
            return password_hash
    except argon2.exceptions.InvalidHashError:
        pass  # falls through to the refusal below: the caller learns why
    raise ApiError("password hash must be Argon2id ($argon2id$...) or bcrypt ($2b$...)")


def _verify(password_hash: str, password: str) -> tuple[bool, bool]:
    """(matches, needs a new Argon2id hash). Blocking."""
    if _BCRYPT_RE.match(password_hash):
        return bcrypt.checkpw(password.encode(), password_hash.encode()), True
    try:
        _hasher.verify(password_hash, password)
    except argon2.exceptions.VerificationError:
        return False, False
    except argon2.exceptions.InvalidHashError:
        return False, False
    return True, _hasher.check_needs_rehash(password_hash)


async def count_admins(session: AsyncSession) -> int:
    """How many enabled admins exist."""
    query = (
        select(func.count()).select_from(User).where(col(User.role) == Role.ADMIN.value, ~col(User.disabled))
    )
    return (await session.exec(query)).one()


async def create_user(
    session: AsyncSession,
    *,
    username: str,
    role: Role,
    password: str | None = None,
    password_hash: str | None = None,
) -> User:
    """A new account from a password (hashed here) or an imported hash; ConflictError if the name is taken."""
    if (password is None) == (password_hash is None):
        raise ValueError("give exactly one of password and password_hash")
    stored = (
        check_password_hash(password_hash)
        if password_hash
        else await asyncio.to_thread(hash_password, password or "")
    )
    user = User(username=username, password_hash=stored, role=role.value)
    session.add(user)
    try:
        await session.commit()
    except sa.exc.IntegrityError:
        await session.rollback()
        raise ConflictError(f"user {username} already exists") from None
    return user


async def login(
    session: AsyncSession, *, secret: str, ttl_s: int, username: str, password: str
) -> tokens.AccessToken:
    """An access token for valid credentials; UnauthorizedError otherwise."""
    user = (await session.exec(select(User).where(col(User.username) == username))).first()
    matches, rehash = await asyncio.to_thread(_verify, user.password_hash if user else _DUMMY_HASH, password)
    if user is None or not matches or user.disabled:
        raise UnauthorizedError(INVALID_LOGIN)
    if rehash:
        user.password_hash = await asyncio.to_thread(hash_password, password)
        await session.commit()
    return tokens.issue(secret, user_id=user.id, token_version=user.token_version, ttl_s=ttl_s)


async def authenticate_access_token(
    session: AsyncSession, secret: str, token: str
) -> tuple[Principal, tokens.AccessClaims]:
    """The user behind a valid, unrevoked access token."""
    claims = tokens.verify(secret, token)
    if await session.get(RevokedAccessToken, claims.jti) is not None:
        raise UnauthorizedError("access token revoked")
    user = await session.get(User, claims.user_id)
    if user is None or user.disabled:
        raise UnauthorizedError("the token's user no longer exists or is disabled")
    if user.token_version != claims.token_version:
        raise UnauthorizedError("access token revoked")
    return Principal(kind="user", id=user.id, name=user.username, role=Role(user.role)), claims


async def logout(session: AsyncSession, claims: tokens.AccessClaims) -> None:
    """Deny this token until it would have expired anyway; drop denylist entries past their expiry."""
    now = datetime.now(UTC)
    await session.exec(delete(RevokedAccessToken).where(col(RevokedAccessToken.expires_at) < now))
    if await session.get(RevokedAccessToken, claims.jti) is None:
        session.add(RevokedAccessToken(jti=claims.jti, expires_at=claims.expires_at))
    await session.commit()


async def revoke_all_sessions(session: AsyncSession, user: User) -> None:
    """Every access token issued to the user so far stops working."""
    user.token_version += 1
    await session.commit()


async def revoke_all_sessions_of(session: AsyncSession, user_id: str) -> None:
    """revoke_all_sessions by user id."""
    user = await session.get(User, user_id)
    if user is None:
        raise UnauthorizedError("the token's user no longer exists")
    await revoke_all_sessions(session, user)


async def change_password(session: AsyncSession, user_id: str, *, current: str, new: str) -> None:
    """Replace the password after checking the current one; signs the user out everywhere."""
    user = await session.get(User, user_id)
    if user is None:
        raise UnauthorizedError("the token's user no longer exists")
    matches, _ = await asyncio.to_thread(_verify, user.password_hash, current)
    if not matches:
        raise ForbiddenError("the current password is wrong")
    user.password_hash = await asyncio.to_thread(hash_password, new)
    await revoke_all_sessions(session, user)


async def authenticate_device(session: AsyncSession, token: str) -> str:
    """The device id of a valid device-signed JWT from an active device (DESIGN.md "Message format")."""
    try:
        header = jwt.get_unverified_header(token)
        claimed = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except jwt.PyJWTError as exc:
        raise UnauthorizedError(f"invalid device token: {exc}") from None
    if header.get("typ") != devicetoken.DEVICE_TOKEN_TYP:
        raise UnauthorizedError("device endpoints accept only device-signed tokens")
    device = await session.get(Device, claimed) if isinstance(claimed, str) else None
    if device is None:
        raise UnauthorizedError("invalid device token: unknown device")
    try:
        key = load_public_key_pem(device.public_key_pem)
    except InvalidKeyError as exc:
        raise UnauthorizedError(f"invalid device token: stored key unusable: {exc}") from None

    def key_for(device_id: str) -> PublicKey:
        if device_id != device.id:
            raise SignatureError("device token names another device")
        return key

    try:
        device_id = devicetoken.verify(token, key_for)
    except SignatureError as exc:
        raise UnauthorizedError(str(exc)) from None
    if device.state is not AdmissionState.ACTIVE:
        raise ForbiddenError(f"device {device_id} is {device.state.value}")
    return device_id
