"""Configuration: fleet defaults and per-device overrides, merged, versioned, sent as signed commands.

Each device has its own version counter: every change to its overrides, and every change to the
fleet defaults that alters its merged values, stores a new `DeviceConfig` row (older rows are the
history) and issues a signed config command carrying the merged values, published retained after
the commit. Raises domain errors, knows nothing of HTTP; every change is audit-logged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from fastapi import Request
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.audit import service as audit
from kernex.api.auth.schemas import Principal
from kernex.api.commands import service as commands
from kernex.api.commands.runtime import CommandRuntime
from kernex.api.configs.schemas import (
    ConfigHistory,
    ConfigVersionOut,
    DeviceConfigView,
    FleetDefaultsOut,
    ReportedConfig,
)
from kernex.api.errors import ConflictError, NotFoundError
from kernex.kit.chunks import chunks
from kernex.kit.logs import get_logger
from kernex.protocol.commands import ConfigBody
from kernex.protocol.config import DeviceSettings, SettingsOverrides, merge
from kernex.protocol.topics import CommandKind
from kernex.storage.configs import reported_config_version
from kernex.storage.models import AdmissionState, Device, DeviceCommand, DeviceConfig, FleetConfig

log = get_logger(__name__)

INLINE_PUBLISH_MAX = 100  # past this many devices, the republisher sends the commands
DEVICE_CHUNK = 500  # devices updated per round of a fleet-wide change (bounded IN lists)


@dataclass(frozen=True)
class _Change:
    device_id: str
    overrides: SettingsOverrides
    merged: DeviceSettings


# --- fleet defaults -------------------------------------------------------------------------


async def fleet_defaults(session: AsyncSession) -> FleetConfig | None:
    """The fleet defaults in effect (the highest version), or None if never set."""
    return (
        await session.exec(select(FleetConfig).order_by(col(FleetConfig.version).desc()).limit(1))
    ).first()


def defaults_out(row: FleetConfig | None, devices_updated: int | None = None) -> FleetDefaultsOut:
    """The API view of the fleet defaults."""
    values = SettingsOverrides.model_validate(row.values) if row else SettingsOverrides()
    return FleetDefaultsOut(
        version=row.version if row else None,
        values=values,
        effective=merge(values),
        created_at=row.created_at if row else None,
        created_by=row.created_by if row else None,
        devices_updated=devices_updated,
    )


async def set_fleet_defaults(
    session: AsyncSession,
    runtime: CommandRuntime,
    values: SettingsOverrides,
    *,
    actor: Principal,
    request: Request | None = None,
) -> FleetDefaultsOut:
    """Store a new defaults version and send every active device whose merged values change a new version."""
    async with audit.audited(session, actor=actor, action="config.defaults", target="fleet", request=request):
        now = datetime.now(UTC)
        current = await fleet_defaults(session)
        row = FleetConfig(
            version=(current.version if current else 0) + 1,
            values=values.model_dump(mode="json", exclude_none=True),
            created_at=now,
            created_by=actor.actor,
        )
        session.add(row)
        try:
            await session.flush()
        except sa.exc.IntegrityError:
            raise ConflictError("the fleet defaults were changed concurrently; retry") from None
        device_ids = list(
            (
                await session.exec(
                    select(Device.id)
                    .where(col(Device.state) == AdmissionState.ACTIVE)
                    .order_by(col(Device.id))
                )
            ).all()
        )
        changed: list[str] = []
        for chunk in chunks(device_ids, DEVICE_CHUNK):
            await commands.lock_devices(session, chunk)
            latest = await _latest_configs(session, chunk)
            changes = []
            for device_id in chunk:
                previous = latest.get(device_id)
                overrides = (
                    SettingsOverrides.model_validate(previous.overrides) if previous else SettingsOverrides()
                )
                merged = merge(values, overrides)
                if previous is None or previous.values != merged.model_dump(mode="json"):
                    changes.append(_Change(device_id, overrides, merged))
            await _store_versions(
                session, runtime, changes, latest, defaults_version=row.version, actor=actor, now=now
            )
            changed += [c.device_id for c in changes]
        await audit.record(
            session,
            actor=actor,
            action="config.defaults",
            target="fleet",
            outcome="success",
            request=request,
            details={"version": row.version, "values": row.values, "devices_updated": len(changed)},
        )
    await _publish(runtime, changed)
    log.info("fleet config defaults set", version=row.version, devices_updated=len(changed))
    return defaults_out(row, devices_updated=len(changed))


# --- per device -----------------------------------------------------------------------------


async def set_device_config(
    session: AsyncSession,
    runtime: CommandRuntime,
    device_id: str,
    overrides: SettingsOverrides,
    *,
    actor: Principal,
    request: Request | None = None,
) -> DeviceConfig:
    """Replace the device's overrides: a new version (merged with the fleet defaults), sent signed."""
    target = f"device:{device_id}"
    async with audit.audited(session, actor=actor, action="config.device", target=target, request=request):
        device = await session.get(Device, device_id)
        if device is None:
            raise NotFoundError(f"device {device_id} not found")
        if device.state is not AdmissionState.ACTIVE:
            raise ConflictError(f"device {device_id} is {device.state.value}")
        now = datetime.now(UTC)
        await commands.lock_devices(session, [device_id])
        defaults = await fleet_defaults(session)
        merged = merge(
            SettingsOverrides.model_validate(defaults.values) if defaults else SettingsOverrides(), overrides
        )
        latest = await _latest_configs(session, [device_id])
        rows = await _store_versions(
            session,
            runtime,
            [_Change(device_id, overrides, merged)],
            latest,
            defaults_version=defaults.version if defaults else None,
            actor=actor,
            now=now,
        )
        await audit.record(
            session,
            actor=actor,
            action="config.device",
            target=target,
            outcome="success",
            request=request,
            details={"version": rows[0].version, "overrides": rows[0].overrides},
        )
    await _publish(runtime, [device_id])
    return rows[0]


async def ensure_fleet_defaults(session: AsyncSession, runtime: CommandRuntime, device_id: str) -> bool:
    """Send a device that has no configuration yet the fleet defaults, if any are set.

    Called when a device registers, so a new device starts from the fleet's settings.
    """
    defaults = await fleet_defaults(session)
    if defaults is None:
        return False
    await commands.lock_devices(session, [device_id])
    latest = await _latest_configs(session, [device_id])
    if device_id in latest:
        await session.rollback()
        return False
    merged = merge(SettingsOverrides.model_validate(defaults.values))
    await _store_versions(
        session,
        runtime,
        [_Change(device_id, SettingsOverrides(), merged)],
        latest,
        defaults_version=defaults.version,
        actor=None,
        now=datetime.now(UTC),
    )
    await session.commit()
    await _publish(runtime, [device_id])
    return True


async def _latest_configs(session: AsyncSession, device_ids: Sequence[str]) -> dict[str, DeviceConfig]:
    newest = (
        select(DeviceConfig.device_id, func.max(DeviceConfig.version).label("version"))
        .where(col(DeviceConfig.device_id).in_(device_ids))
        .group_by(col(DeviceConfig.device_id))
        .subquery()
    )
    rows = await session.exec(
        select(DeviceConfig).join(
            newest,
            sa.and_(
                col(DeviceConfig.device_id) == newest.c.device_id,
                col(DeviceConfig.version) == newest.c.version,
            ),
        )
    )
    return {row.device_id: row for row in rows.all()}


async def _store_versions(
    session: AsyncSession,
    runtime: CommandRuntime,
    changes: Sequence[_Change],
    latest: dict[str, DeviceConfig],
    *,
    defaults_version: int | None,
    actor: Principal | None,
    now: datetime,
) -> list[DeviceConfig]:
    rows: list[DeviceConfig] = []
    requests: list[commands.CommandRequest] = []
    for change in changes:
        previous = latest.get(change.device_id)
        values = change.merged.model_dump(mode="json")
        row = DeviceConfig(
            device_id=change.device_id,
            version=(previous.version if previous else 0) + 1,
            values=values,
            overrides=change.overrides.model_dump(mode="json", exclude_none=True),
            defaults_version=defaults_version,
            created_at=now,
            created_by=actor.actor if actor else "system",
        )
        session.add(row)
        rows.append(row)
        requests.append(
            commands.CommandRequest(
                device_id=change.device_id, config=ConfigBody(version=row.version, values=values)
            )
        )
    # One UPDATE per distinct interval (and ID_CHUNK devices), not per device: each statement is
    # synchronised against the whole session, so per-device updates grew with the fleet squared.
    by_interval: dict[int | None, list[str]] = defaultdict(list)
    for change in changes:
        by_interval[change.merged.heartbeat_interval_s].append(change.device_id)
    for interval, device_ids in by_interval.items():
        for chunk in chunks(device_ids, commands.ID_CHUNK):
            await session.exec(
                sa.update(Device)
                .where(col(Device.id).in_(chunk))
                .values(heartbeat_interval_s=interval)
                .execution_options(synchronize_session="fetch")
            )
    await session.flush()
    await commands.issue(session, runtime.signer, requests, now)
    return rows


async def _publish(runtime: CommandRuntime, device_ids: Sequence[str]) -> None:
    if len(device_ids) > INLINE_PUBLISH_MAX:
        runtime.publisher.wake()
        return
    await runtime.publisher.sync_topics([(d, CommandKind.CONFIG.value) for d in device_ids])


# --- read -----------------------------------------------------------------------------------


async def device_config(session: AsyncSession, device_id: str) -> DeviceConfigView:
    """Desired against reported, and whether the device is in sync."""
    device = await session.get(Device, device_id, populate_existing=True)
    if device is None:
        raise NotFoundError(f"device {device_id} not found")
    latest = (await _latest_configs(session, [device_id])).get(device_id)
    desired = (await _versions_out(session, [latest]))[0] if latest else None
    reported = ReportedConfig(
        version=reported_config_version(
            heartbeat_version=device.config_version,
            heartbeat_seq=device.last_seq,
            applied_version=device.config_applied_version,
            applied_seq=device.config_applied_seq,
        ),
        applied_at=device.config_applied_at,
        error=device.config_error,
    )
    in_sync = desired is None or reported.version == desired.version
    return DeviceConfigView(device_id=device_id, desired=desired, reported=reported, in_sync=in_sync)


async def device_config_history(session: AsyncSession, device_id: str, *, limit: int) -> ConfigHistory:
    """The device's configuration versions, newest first."""
    if await session.get(Device, device_id) is None:
        raise NotFoundError(f"device {device_id} not found")
    rows = (
        await session.exec(
            select(DeviceConfig)
            .where(col(DeviceConfig.device_id) == device_id)
            .order_by(col(DeviceConfig.version).desc())
            .limit(limit)
        )
    ).all()
    return ConfigHistory(device_id=device_id, items=await _versions_out(session, rows))


async def _versions_out(session: AsyncSession, rows: Sequence[DeviceConfig]) -> list[ConfigVersionOut]:
    if not rows:
        return []
    device_id = rows[0].device_id
    commands_by_version = {
        c.config_version: c
        for c in (
            await session.exec(
                select(DeviceCommand).where(
                    col(DeviceCommand.device_id) == device_id,
                    col(DeviceCommand.kind) == CommandKind.CONFIG.value,
                    col(DeviceCommand.config_version).in_([r.version for r in rows]),
                )
            )
        ).all()
    }
    out = []
    for row in rows:
        command = commands_by_version.get(row.version)
        out.append(
            ConfigVersionOut(
                version=row.version,
                values=DeviceSettings.model_validate(row.values),
                overrides=SettingsOverrides.model_validate(row.overrides),
                defaults_version=row.defaults_version,
                created_at=row.created_at,
                created_by=row.created_by,
                command_id=command.id if command else None,
                command_state=command.state if command else None,
            )
        )
    return out
