"""`kernex users ...` and `kernex tokens ...`: operator accounts and API tokens from the shell.

A generated password or token is printed once to stdout and never logged. Server packages are
imported inside the commands, so a device without the `server` extra can still run the agent.
"""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from kernex.kit import logs
from kernex.protocol.exceptions import KernexError

if TYPE_CHECKING:
    from sqlmodel.ext.asyncio.session import AsyncSession

    from kernex.storage.settings import StorageSettings

T = TypeVar("T")
GENERATED_PASSWORD_BYTES = 18  # 24 URL-safe characters, 144 bits: beyond guessing, still typeable
CLI_ACTOR = "system:cli"  # how the audit log names changes made from the shell

users_app = typer.Typer(no_args_is_help=True)
tokens_app = typer.Typer(no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"kernex: {message}", err=True)
    return typer.Exit(1)


def _require_server() -> None:
    for module in ("fastapi", "sqlmodel", "argon2"):
        if importlib.util.find_spec(module) is None:
            raise _fail(f"server components are not installed ({module}): pip install 'kernex[server]'")


def _settings() -> StorageSettings:
    from kernex.storage.settings import StorageSettings  # noqa: PLC0415 - server extra

    try:
        settings = StorageSettings()
    except ValueError as exc:
        raise _fail(f"invalid settings: {exc}") from None
    # Log lines go to stderr, so stdout carries only what the command prints (a password, a token).
    logs.configure(settings.log_level, settings.log_format_in_effect)
    return settings


def _run(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Migrate (idempotent), then run work in one session; Kernex errors become exit status 1."""
    from kernex.storage.database import engine_scope, session_factory  # noqa: PLC0415 - server extra
    from kernex.storage.migrate import upgrade  # noqa: PLC0415 - server extra

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def main() -> T:
        async with (
            engine_scope(settings.resolved_database_url) as engine,
            session_factory(engine)() as session,
        ):
            return await work(session)

    try:
        upgrade(settings.resolved_database_url)
        return asyncio.run(main())
    except KernexError as exc:
        raise _fail(str(exc)) from None


def first_run_admin(database_url: str, username: str = "admin") -> str | None:
    """For `kernex up`: create the first admin on a fleet without one; its password, or None."""
    from kernex.storage.database import engine_scope, session_factory  # noqa: PLC0415 - server extra

    async def main() -> str | None:
        async with engine_scope(database_url) as engine, session_factory(engine)() as session:
            return await create_first_admin(session, username)

    return asyncio.run(main())


def generate_password() -> str:
    """A random password for a first admin."""
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)


async def create_admin(
    session: AsyncSession, username: str, password: str, *, actor: str = CLI_ACTOR
) -> None:
    """Create an admin account and audit it (ConflictError when the name is taken)."""
    from kernex.api.audit import service as audit  # noqa: PLC0415 - server extra
    from kernex.api.auth import service  # noqa: PLC0415 - server extra
    from kernex.api.auth.schemas import Role  # noqa: PLC0415 - server extra

    user = await service.create_user(session, username=username, role=Role.ADMIN, password=password)
    await audit.record(
        session,
        actor=actor,
        action="user.register",
        target=f"user:{username}",
        outcome="success",
        details={"role": Role.ADMIN.value, "user_id": user.id},
    )


async def create_first_admin(session: AsyncSession, username: str = "admin") -> str | None:
    """On a fleet without any admin, create one with a generated password and return it; else None."""
    from kernex.api.auth import service  # noqa: PLC0415 - server extra

    if await service.count_admins(session) > 0:
        return None
    password = generate_password()
    await create_admin(session, username, password, actor="system:first-run")
    return password


def _read_secret_line(what: str) -> str:
    value = sys.stdin.readline().rstrip("\r\n")
    if not value:
        raise _fail(f"no {what} on standard input")
    return value


@users_app.command("create-admin")
def create_admin_command(
    username: Annotated[str, typer.Option(help="The admin's username")] = "admin",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input")
    ] = False,
) -> None:
    """Create an admin account; without --password-stdin a password is generated and printed once."""
    _require_server()
    from kernex.api.auth.schemas import PASSWORD_MIN_CHARS  # noqa: PLC0415 - server extra

    password = _read_secret_line("password") if password_stdin else generate_password()
    if len(password) < PASSWORD_MIN_CHARS:
        raise _fail(f"the password needs at least {PASSWORD_MIN_CHARS} characters")
    _run(lambda session: create_admin(session, username, password))
    if password_stdin:
        typer.echo(f"admin {username} created")
    else:
        typer.echo(f"admin {username} created; password (shown once, not stored in clear): {password}")


@users_app.command("import")
def import_user(
    username: Annotated[str, typer.Argument(help="The username")],
    role: Annotated[str, typer.Option(help="admin, operator or viewer")] = "viewer",
) -> None:
    """Create an account from an existing Argon2id or bcrypt hash read from standard input."""
    _require_server()
    from kernex.api.audit import service as audit  # noqa: PLC0415 - server extra
    from kernex.api.auth import service  # noqa: PLC0415 - server extra
    from kernex.api.auth.schemas import Role  # noqa: PLC0415 - server extra

    try:
        chosen = Role(role)
    except ValueError:
        raise _fail(f"unknown role {role!r}: admin, operator or viewer") from None
    password_hash = _read_secret_line("password hash")

    async def work(session: AsyncSession) -> None:
        await service.create_user(session, username=username, role=chosen, password_hash=password_hash)
        await audit.record(
            session, actor=CLI_ACTOR, action="user.import", target=f"user:{username}", outcome="success"
        )

    _run(work)
    typer.echo(f"user {username} imported ({chosen.value})")


@tokens_app.command("create")
def create_token(
    name: Annotated[str, typer.Argument(help="Who or what uses the token, e.g. ci-deploy")],
    scope: Annotated[str, typer.Option(help="read or operator")] = "read",
    expires_in_days: Annotated[int | None, typer.Option(min=1, help="Expiry; none: until revoked")] = None,
) -> None:
    """Create an API token and print it once."""
    _require_server()
    from kernex.api.apitokens import service  # noqa: PLC0415 - server extra
    from kernex.api.apitokens.schemas import ApiTokenScope  # noqa: PLC0415 - server extra
    from kernex.api.audit import service as audit  # noqa: PLC0415 - server extra

    try:
        chosen = ApiTokenScope(scope)
    except ValueError:
        raise _fail(f"unknown scope {scope!r}: read or operator") from None

    async def work(session: AsyncSession) -> str:
        row, token = await service.create(
            session, name=name, scope=chosen, expires_in_days=expires_in_days, created_by=CLI_ACTOR
        )
        await audit.record(
            session,
            actor=CLI_ACTOR,
            action="token.create",
            target=f"api_token:{row.id}",
            outcome="success",
            details={"name": name, "scope": chosen.value},
        )
        return token

    typer.echo(_run(work))


@tokens_app.command("list")
def list_tokens() -> None:
    """List API tokens (never their secrets)."""
    _require_server()
    from kernex.api.apitokens import service  # noqa: PLC0415 - server extra

    for row in _run(service.list_tokens):
        state = "revoked" if row.revoked_at else "active"
        expires = row.expires_at.isoformat() if row.expires_at else "never"
        last = row.last_used_at.isoformat() if row.last_used_at else "never"
        typer.echo(f"{row.id}  {row.scope:<8}  {state:<7}  expires {expires}  last used {last}  {row.name}")


@tokens_app.command("revoke")
def revoke_token(token_id: Annotated[str, typer.Argument(help="The token's id (kx_<id>_...)")]) -> None:
    """Revoke an API token at once."""
    _require_server()
    from kernex.api.apitokens import service  # noqa: PLC0415 - server extra
    from kernex.api.audit import service as audit  # noqa: PLC0415 - server extra

    async def work(session: AsyncSession) -> None:
        await service.revoke(session, token_id)
        await audit.record(
            session, actor=CLI_ACTOR, action="token.revoke", target=f"api_token:{token_id}", outcome="success"
        )

    _run(work)
    typer.echo(f"token {token_id} revoked")


def register(app: typer.Typer) -> None:
    """Add the users and tokens commands to the root app."""
    app.add_typer(users_app, name="users", help="Manage operator accounts.")
    app.add_typer(tokens_app, name="tokens", help="Manage API tokens for integrators and CI.")
