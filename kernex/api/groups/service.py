"""Device tags and groups, and resolving a device selector to the active devices it names now.

A static group holds the devices an operator listed; a dynamic group is a saved filter evaluated
whenever it is read or a rollout phase starts, so devices registered since then join it. Filters
are matched here, in Python, so SQLite and PostgreSQL agree (tags are a JSON list). Raises domain
errors, knows nothing of HTTP; every mutation is audited, refusals included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from fastapi import Request
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.audit import service as audit
from kernex.api.auth.schemas import Principal
from kernex.api.errors import ConflictError, NotFoundError
from kernex.api.groups.schemas import (
    NO_BUNDLE,
    GroupCreate,
    GroupFilter,
    GroupKind,
    GroupOut,
    GroupUpdate,
)
from kernex.kit.logs import get_logger
from kernex.storage.deployments import ACTIVE_ROLLOUT_STATES
from kernex.storage.models import AdmissionState, Device, DeviceGroup, DeviceGroupMember, Rollout

log = get_logger(__name__)

HARDWARE_DEVICE_TYPE = "device_type"  # the key of Device.hardware the agent reports its type under
NAMED_IN_ERRORS = 5  # ids an error message lists before "and N more"


def _names(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:NAMED_IN_ERRORS])
    return shown if len(ids) <= NAMED_IN_ERRORS else f"{shown} and {len(ids) - NAMED_IN_ERRORS} more"


# --- matching and selection -----------------------------------------------------------------


def device_type(device: Device) -> str | None:
    """The device type its agent reported at registration, if any."""
    value = (device.hardware or {}).get(HARDWARE_DEVICE_TYPE)
    return value if isinstance(value, str) else None


def matches(device: Device, criteria: GroupFilter) -> bool:
    """Whether the device meets every criterion of the filter."""
    tags = set(device.tags or ())
    checks = (
        criteria.tags_all is None or set(criteria.tags_all) <= tags,
        criteria.tags_any is None or bool(set(criteria.tags_any) & tags),
        criteria.status is None or device.status in criteria.status,
        criteria.bundle_versions is None or (device.bundle_version or NO_BUNDLE) in criteria.bundle_versions,
        criteria.device_types is None or device_type(device) in criteria.device_types,
    )
    return all(checks)


async def _active_devices(session: AsyncSession, *conditions: sa.ColumnElement[bool]) -> list[Device]:
    rows = await session.exec(
        select(Device)
        .where(col(Device.state) == AdmissionState.ACTIVE, *conditions)
        .order_by(col(Device.id))
        .execution_options(populate_existing=True)
    )
    return list(rows.all())


async def group_devices(session: AsyncSession, group: DeviceGroup) -> list[Device]:
    """The group's active devices now, by id: its listed members, or what its filter matches."""
    if group.kind == GroupKind.STATIC:
        listed = select(DeviceGroupMember.device_id).where(col(DeviceGroupMember.group_id) == group.id)
        return await _active_devices(session, col(Device.id).in_(listed))
    criteria = GroupFilter.model_validate(group.filter or {})
    return [d for d in await _active_devices(session) if matches(d, criteria)]


async def resolve(session: AsyncSession, selector: Mapping[str, Any]) -> list[str]:
    """The active devices a selector names now, by id.

    `{"device_ids": [...]}` (those of them still active), `{"tags": [...]}` (carrying all of
    them) or `{"group_id": ...}` (its members now; NotFoundError if the group is gone).
    """
    if selector.get("group_id") is not None:
        group = await get_group(session, str(selector["group_id"]))
        return [d.id for d in await group_devices(session, group)]
    if selector.get("device_ids") is not None:
        wanted = list(selector["device_ids"])
        return [d.id for d in await _active_devices(session, col(Device.id).in_(wanted))]
    tags = set(selector.get("tags") or ())
    return [d.id for d in await _active_devices(session) if tags <= set(d.tags or ())]


# --- groups ---------------------------------------------------------------------------------


async def get_group(session: AsyncSession, group_id: str) -> DeviceGroup:
    """One group, or NotFoundError."""
    group = await session.get(DeviceGroup, group_id, populate_existing=True)
    if group is None:
        raise NotFoundError(f"group {group_id} not found")
    return group


async def to_out(session: AsyncSession, group: DeviceGroup) -> GroupOut:
    """The group with its current size."""
    return GroupOut(
        id=group.id,
        name=group.name,
        kind=GroupKind(group.kind),
        description=group.description,
        filter=group.filter,
        size=len(await group_devices(session, group)),
        created_at=group.created_at,
        created_by=group.created_by,
        updated_at=group.updated_at,
    )


async def list_groups(session: AsyncSession, *, limit: int, offset: int) -> tuple[list[DeviceGroup], int]:
    """A page of groups by name, with the total count."""
    total = (await session.exec(select(func.count()).select_from(DeviceGroup))).one()
    rows = await session.exec(
        select(DeviceGroup).order_by(col(DeviceGroup.name), col(DeviceGroup.id)).limit(limit).offset(offset)
    )
    return list(rows.all()), total


async def _name_free(session: AsyncSession, name: str, *, other_than: str | None = None) -> None:
    found = (await session.exec(select(DeviceGroup.id).where(col(DeviceGroup.name) == name))).first()
    if found is not None and found != other_than:
        raise ConflictError(f"a group named {name!r} exists already")


async def _existing_devices(session: AsyncSession, device_ids: Sequence[str]) -> list[str]:
    wanted = sorted(set(device_ids))
    found = set((await session.exec(select(Device.id).where(col(Device.id).in_(wanted)))).all())
    missing = [d for d in wanted if d not in found]
    if missing:
        raise NotFoundError(f"no such devices: {_names(missing)}")
    return wanted


async def create(
    session: AsyncSession, body: GroupCreate, *, actor: Principal, request: Request | None = None
) -> DeviceGroup:
    """Create a group (a static one with its first members)."""
    async with audit.audited(session, actor=actor, action="group.create", target=None, request=request):
        await _name_free(session, body.name)
        members = await _existing_devices(session, body.device_ids or [])
        now = datetime.now(UTC)
        group = DeviceGroup(
            name=body.name,
            kind=body.kind.value,
            description=body.description,
            filter=body.filter.model_dump(mode="json", exclude_none=True) if body.filter else None,
            created_at=now,
            created_by=actor.actor,
            updated_at=now,
        )
        session.add(group)
        await session.flush()
        session.add_all(DeviceGroupMember(group_id=group.id, device_id=d, added_at=now) for d in members)
        await audit.record(
            session,
            actor=actor,
            action="group.create",
            target=f"group:{group.id}",
            outcome="success",
            request=request,
            details={"name": group.name, "kind": group.kind, "filter": group.filter, "members": len(members)},
        )
    log.info("group created", group_id=group.id, kind=group.kind, members=len(members))
    return await get_group(session, group.id)


async def update(
    session: AsyncSession,
    group_id: str,
    body: GroupUpdate,
    *,
    actor: Principal,
    request: Request | None = None,
) -> DeviceGroup:
    """Rename or describe a group, or replace a dynamic group's filter."""
    target = f"group:{group_id}"
    async with audit.audited(session, actor=actor, action="group.update", target=target, request=request):
        group = await get_group(session, group_id)
        if body.filter is not None and group.kind != GroupKind.DYNAMIC:
            raise ConflictError(f"group {group_id} is static: it has members, not a filter")
        if body.name is not None:
            await _name_free(session, body.name, other_than=group.id)
            group.name = body.name
        if "description" in body.model_fields_set:
            group.description = body.description
        if body.filter is not None:
            group.filter = body.filter.model_dump(mode="json", exclude_none=True)
        group.updated_at = datetime.now(UTC)
        session.add(group)
        await audit.record(
            session,
            actor=actor,
            action="group.update",
            target=target,
            outcome="success",
            request=request,
            details=body.model_dump(mode="json", exclude_unset=True),
        )
    return await get_group(session, group_id)


async def delete(
    session: AsyncSession, group_id: str, *, actor: Principal, request: Request | None = None
) -> None:
    """Delete a group, unless a rollout still running selects its devices by it (409)."""
    target = f"group:{group_id}"
    async with audit.audited(session, actor=actor, action="group.delete", target=target, request=request):
        group = await get_group(session, group_id)
        rollouts = (
            await session.exec(
                select(Rollout.deployment_id, Rollout.selector).where(
                    col(Rollout.state).in_([s.value for s in ACTIVE_ROLLOUT_STATES])
                )
            )
        ).all()
        using = sorted(d for d, selector in rollouts if (selector or {}).get("group_id") == group_id)
        if using:
            raise ConflictError(
                f"group {group_id} selects the devices of rollouts in progress: {_names(using)}"
            )
        await session.delete(group)
        await audit.record(
            session,
            actor=actor,
            action="group.delete",
            target=target,
            outcome="success",
            request=request,
            details={"name": group.name},
        )


async def _static(session: AsyncSession, group_id: str) -> DeviceGroup:
    group = await get_group(session, group_id)
    if group.kind != GroupKind.STATIC:
        raise ConflictError(f"group {group_id} is dynamic: its filter decides its members")
    return group


async def add_members(
    session: AsyncSession,
    group_id: str,
    device_ids: Sequence[str],
    *,
    actor: Principal,
    request: Request | None = None,
) -> DeviceGroup:
    """Add devices to a static group (devices already in it stay as they are)."""
    target = f"group:{group_id}"
    async with audit.audited(
        session, actor=actor, action="group.members.add", target=target, request=request
    ):
        group = await _static(session, group_id)
        wanted = await _existing_devices(session, device_ids)
        present = set(
            (
                await session.exec(
                    select(DeviceGroupMember.device_id).where(
                        col(DeviceGroupMember.group_id) == group_id,
                        col(DeviceGroupMember.device_id).in_(wanted),
                    )
                )
            ).all()
        )
        now = datetime.now(UTC)
        added = [d for d in wanted if d not in present]
        session.add_all(DeviceGroupMember(group_id=group_id, device_id=d, added_at=now) for d in added)
        group.updated_at = now
        session.add(group)
        await audit.record(
            session,
            actor=actor,
            action="group.members.add",
            target=target,
            outcome="success",
            request=request,
            details={"added": len(added), "devices": added[:100]},
        )
    return await get_group(session, group_id)


async def remove_member(
    session: AsyncSession, group_id: str, device_id: str, *, actor: Principal, request: Request | None = None
) -> None:
    """Take a device out of a static group (404 if it is not in it)."""
    target = f"group:{group_id}"
    async with audit.audited(
        session, actor=actor, action="group.members.remove", target=target, request=request
    ):
        await _static(session, group_id)
        member = await session.get(DeviceGroupMember, (group_id, device_id))
        if member is None:
            raise NotFoundError(f"device {device_id} is not in group {group_id}")
        await session.delete(member)
        await audit.record(
            session,
            actor=actor,
            action="group.members.remove",
            target=target,
            outcome="success",
            request=request,
            details={"device_id": device_id},
        )


# --- tags -----------------------------------------------------------------------------------


async def set_tags(
    session: AsyncSession,
    device_id: str,
    tags: Sequence[str],
    *,
    actor: Principal,
    request: Request | None = None,
) -> Device:
    """Replace a device's tags (sorted, without repeats)."""
    target = f"device:{device_id}"
    async with audit.audited(session, actor=actor, action="device.tags.set", target=target, request=request):
        device = await session.get(Device, device_id)
        if device is None:
            raise NotFoundError(f"device {device_id} not found")
        before = list(device.tags or ())
        device.tags = sorted(set(tags))
        device.updated_at = datetime.now(UTC)
        session.add(device)
        await audit.record(
            session,
            actor=actor,
            action="device.tags.set",
            target=target,
            outcome="success",
            request=request,
            details={"before": before, "after": device.tags},
        )
    await session.refresh(device)
    return device
