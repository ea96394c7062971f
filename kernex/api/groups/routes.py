"""`/api/v1/groups` (static and dynamic device groups) and `PUT /api/v1/devices/{id}/tags`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from kernex.api.auth.deps import OperatorDep, ViewerDep
from kernex.api.deps import SessionDep
from kernex.api.devices import service as devices
from kernex.api.devices.schemas import DeviceOut
from kernex.api.groups import service
from kernex.api.groups.schemas import (
    GroupCreate,
    GroupDevices,
    GroupOut,
    GroupPage,
    GroupUpdate,
    MembersChange,
    TagsUpdate,
)

PAGE_MAX = 500  # bounds one response's size and query cost

router = APIRouter(prefix="/api/v1/groups", tags=["groups"])
device_router = APIRouter(prefix="/api/v1/devices", tags=["groups"])

Limit = Annotated[int, Query(ge=1, le=PAGE_MAX)]
Offset = Annotated[int, Query(ge=0, le=10_000_000)]


@router.post(
    "",
    response_model=GroupOut,
    status_code=status.HTTP_201_CREATED,
    operation_id="createGroup",
    responses={404: {"description": "A listed device does not exist"}, 409: {"description": "Name taken"}},
)
async def create_group(
    body: GroupCreate, request: Request, session: SessionDep, principal: OperatorDep
) -> GroupOut:
    """Create a static group (listed members) or a dynamic one (a filter over tags, status, version, type)."""
    group = await service.create(session, body, actor=principal, request=request)
    return await service.to_out(session, group)


@router.get("", response_model=GroupPage, operation_id="listGroups")
async def list_groups(
    session: SessionDep, _viewer: ViewerDep, limit: Limit = 50, offset: Offset = 0
) -> GroupPage:
    """Groups by name, each with its size now."""
    rows, total = await service.list_groups(session, limit=limit, offset=offset)
    items = [await service.to_out(session, g) for g in rows]
    return GroupPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/{group_id}", response_model=GroupOut, operation_id="getGroup")
async def get_group(group_id: str, session: SessionDep, _viewer: ViewerDep) -> GroupOut:
    """One group and its size now."""
    return await service.to_out(session, await service.get_group(session, group_id))


@router.patch(
    "/{group_id}",
    response_model=GroupOut,
    operation_id="updateGroup",
    responses={409: {"description": "Name taken, or a filter given for a static group"}},
)
async def update_group(
    group_id: str, body: GroupUpdate, request: Request, session: SessionDep, principal: OperatorDep
) -> GroupOut:
    """Rename or describe a group, or replace a dynamic group's filter."""
    group = await service.update(session, group_id, body, actor=principal, request=request)
    return await service.to_out(session, group)


@router.delete(
    "/{group_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="deleteGroup",
    responses={409: {"description": "A rollout in progress selects its devices by this group"}},
)
async def delete_group(
    group_id: str, request: Request, session: SessionDep, principal: OperatorDep
) -> Response:
    """Delete a group (its devices stay as they are)."""
    await service.delete(session, group_id, actor=principal, request=request)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{group_id}/devices", response_model=GroupDevices, operation_id="listGroupDevices")
async def list_group_devices(
    group_id: str, session: SessionDep, _viewer: ViewerDep, limit: Limit = 100, offset: Offset = 0
) -> GroupDevices:
    """The group's active devices now (a dynamic group evaluated now), by id."""
    members = await service.group_devices(session, await service.get_group(session, group_id))
    page = members[offset : offset + limit]
    return GroupDevices(
        group_id=group_id,
        items=[devices.to_out(d) for d in page],
        total=len(members),
        limit=limit,
        offset=offset,
    )


@router.post(
    "/{group_id}/members",
    response_model=GroupOut,
    operation_id="addGroupMembers",
    responses={
        404: {"description": "A listed device does not exist"},
        409: {"description": "A dynamic group"},
    },
)
async def add_members(
    group_id: str, body: MembersChange, request: Request, session: SessionDep, principal: OperatorDep
) -> GroupOut:
    """Add devices to a static group."""
    group = await service.add_members(session, group_id, body.device_ids, actor=principal, request=request)
    return await service.to_out(session, group)


@router.delete(
    "/{group_id}/members/{device_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="removeGroupMember",
    responses={409: {"description": "A dynamic group"}},
)
async def remove_member(
    group_id: str, device_id: str, request: Request, session: SessionDep, principal: OperatorDep
) -> Response:
    """Take a device out of a static group."""
    await service.remove_member(session, group_id, device_id, actor=principal, request=request)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@device_router.put("/{device_id}/tags", response_model=DeviceOut, operation_id="setDeviceTags")
async def set_tags(
    device_id: str, body: TagsUpdate, request: Request, session: SessionDep, principal: OperatorDep
) -> DeviceOut:
    """Replace a device's tags (tags select deployments and dynamic groups)."""
    device = await service.set_tags(session, device_id, body.tags, actor=principal, request=request)
    return devices.to_out(device)
