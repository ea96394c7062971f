"""Issuing signed commands: a per-device revision, the command signed and recorded as pending.

A command is recorded in the caller's transaction, together with whatever it carries out
(a deployment target, a configuration version), and published after the commit
(kernex.api.commands.publisher). If the broker is down then, it stays pending and the
republisher sends it later: nothing an operator was told succeeded is lost to a broker blip.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.kit.chunks import chunks
from kernex.protocol.commands import Command, ConfigBody, DeployBody, sign_command
from kernex.protocol.keys import PrivateKey
from kernex.protocol.topics import CommandKind
from kernex.storage.models import Device, DeviceCommand

# Ids per IN (...): under SQLite's and asyncpg's 32,767 bind parameters, with room to spare.
ID_CHUNK = 5_000


class CommandState(StrEnum):
    """Where a recorded command stands on the broker (DeviceCommand.state)."""

    PENDING = "pending"  # recorded; not yet published
    PUBLISHED = "published"  # retained on the device's command topic
    CLEARING = "clearing"  # withdrawn; the empty retained message that removes it is not yet published
    CLEARED = "cleared"  # withdrawn and removed from the broker
    SUPERSEDED = "superseded"  # a newer command of the same kind replaced it before it was published


@dataclass(frozen=True)
class CommandSigner:
    """The control-plane key commands are signed with, and how long they stay valid."""

    key: PrivateKey
    key_id: str
    ttl: timedelta


@dataclass(frozen=True)
class CommandRequest:
    """What to send one device."""

    device_id: str
    deploy: DeployBody | None = None
    config: ConfigBody | None = None

    @property
    def kind(self) -> CommandKind:
        """The command topic it goes to."""
        return CommandKind.DEPLOY if self.deploy is not None else CommandKind.CONFIG


async def lock_devices(session: AsyncSession, device_ids: Sequence[str]) -> None:
    """Serialise command issuers (and ingest's reports) per device until commit, in id order.

    On SQLite the first statement must write, so the transaction holds the write lock before it
    reads what it checks; there the whole file is locked anyway.
    """
    connection = await session.connection()
    if connection.dialect.name == "sqlite":
        await session.exec(
            sa.update(Device)
            .where(col(Device.id).in_(device_ids))
            .values(command_revision=col(Device.command_revision))
        )
    else:
        await session.exec(
            select(Device.id)
            .where(col(Device.id).in_(device_ids))
            .order_by(col(Device.id))
            .with_for_update(key_share=True)
        )


async def issue(
    session: AsyncSession,
    signer: CommandSigner,
    requests: Sequence[CommandRequest],
    now: datetime,
    *,
    expires_at: datetime | None = None,
) -> list[DeviceCommand]:
    """Record one signed command per request in the session's transaction (the caller commits).

    The commands expire after the signer's ttl, or at `expires_at` if that is sooner (a rollout's
    maintenance window closing: agents ignore expired commands).

    Each device's revision is bumped with an UPDATE in this transaction, so concurrent issuers
    queue on the device row and revisions never repeat. Older commands of the same kind still
    waiting to be published (or cleared) are superseded: only the newest is worth sending.
    Both are set-based (a statement per ID_CHUNK devices): one statement per device, each
    synchronised against the whole session, made a 10,000-device deployment take 197 s.
    """
    device_ids = [request.device_id for request in requests]
    if len(set(device_ids)) != len(device_ids):
        raise ValueError("one command per device per call")
    revisions: dict[str, int] = {}
    for chunk in chunks(device_ids, ID_CHUNK):
        bumped = await session.exec(
            sa.update(Device)
            .where(col(Device.id).in_(chunk))
            .values(command_revision=col(Device.command_revision) + 1)
            .returning(col(Device.id), col(Device.command_revision))
            .execution_options(synchronize_session="fetch")
        )
        revisions.update((device_id, revision) for device_id, revision in bumped)
    commands = [
        Command(
            command_id=uuid.uuid4().hex,
            device_id=request.device_id,
            kind=request.kind,
            revision=revisions[request.device_id],
            issued_at=now,
            expires_at=min(now + signer.ttl, expires_at) if expires_at else now + signer.ttl,
            deploy=request.deploy,
            config=request.config,
        )
        for request in requests
    ]
    # ECDSA signing is quick, but a fleet-wide change signs thousands: keep it off the event loop.
    tokens = await asyncio.to_thread(lambda: [sign_command(c, signer.key, signer.key_id) for c in commands])
    for kind in {request.kind for request in requests}:
        for chunk in chunks([r.device_id for r in requests if r.kind is kind], ID_CHUNK):
            await session.exec(
                sa.update(DeviceCommand)
                .where(
                    col(DeviceCommand.device_id).in_(chunk),
                    col(DeviceCommand.kind) == kind.value,
                    # Unsent, or a withdrawal not yet sent: the new command replaces either on the topic.
                    col(DeviceCommand.state).in_([CommandState.PENDING.value, CommandState.CLEARING.value]),
                )
                .values(state=CommandState.SUPERSEDED.value)
                .execution_options(synchronize_session="fetch")
            )
    rows: list[DeviceCommand] = []
    for command, token in zip(commands, tokens, strict=True):
        row = DeviceCommand(
            id=command.command_id,
            device_id=command.device_id,
            kind=command.kind.value,
            revision=command.revision,
            state=CommandState.PENDING.value,
            token=token,
            deployment_id=command.deploy.deployment_id if command.deploy else None,
            config_version=command.config.version if command.config else None,
            issued_at=command.issued_at,
            expires_at=command.expires_at,
        )
        session.add(row)
        rows.append(row)
    await session.flush()
    return rows


async def withdraw(session: AsyncSession, command_ids: Sequence[str]) -> list[DeviceCommand]:
    """Mark commands for clearing from the broker (the caller commits, then publishes).

    Only a command that is still the newest of its kind for its device is cleared: an empty
    retained message would otherwise delete a newer command.
    """
    if not command_ids:
        return []
    rows = list(
        (await session.exec(select(DeviceCommand).where(col(DeviceCommand.id).in_(command_ids)))).all()
    )
    withdrawn: list[DeviceCommand] = []
    for row in rows:
        newest = (
            await session.exec(
                select(DeviceCommand.id)
                .where(col(DeviceCommand.device_id) == row.device_id, col(DeviceCommand.kind) == row.kind)
                .order_by(col(DeviceCommand.revision).desc())
                .limit(1)
            )
        ).first()
        if newest != row.id:
            continue
        if row.state in {CommandState.PENDING, CommandState.PUBLISHED}:
            row.state = CommandState.CLEARING.value
            session.add(row)
            withdrawn.append(row)
    await session.flush()
    return withdrawn


async def standing(session: AsyncSession, device_id: str, now: datetime) -> list[DeviceCommand]:
    """The device's current command of each kind (what its retained topics hold or will hold).

    The newest command of a kind, unless it was withdrawn or has expired.
    """
    found: list[DeviceCommand] = []
    for kind in CommandKind:
        row = (
            await session.exec(
                select(DeviceCommand)
                .where(col(DeviceCommand.device_id) == device_id, col(DeviceCommand.kind) == kind.value)
                .order_by(col(DeviceCommand.revision).desc())
                .limit(1)
            )
        ).first()
        if (
            row is not None
            and row.state in {CommandState.PENDING, CommandState.PUBLISHED}
            and row.expires_at > now
        ):
            found.append(row)
    return found
