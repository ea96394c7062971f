"""`/api/v1/devices/{id}/config` (per-device overrides) and `/api/v1/config/defaults` (fleet-wide)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from kernex.api.auth.deps import OperatorDep, ViewerDep
from kernex.api.commands.runtime import CommandsDep
from kernex.api.configs import service
from kernex.api.configs.schemas import ConfigHistory, DeviceConfigView, FleetDefaultsOut
from kernex.api.deps import SessionDep
from kernex.protocol.config import SettingsOverrides

PAGE_MAX = 500

device_router = APIRouter(prefix="/api/v1/devices", tags=["configuration"])
router = APIRouter(prefix="/api/v1/config", tags=["configuration"])


@device_router.get("/{device_id}/config", response_model=DeviceConfigView, operation_id="getDeviceConfig")
async def get_device_config(device_id: str, session: SessionDep, _viewer: ViewerDep) -> DeviceConfigView:
    """The desired configuration against what the device reported, and whether it is in sync."""
    return await service.device_config(session, device_id)


@device_router.put(
    "/{device_id}/config",
    response_model=DeviceConfigView,
    operation_id="putDeviceConfig",
    responses={409: {"description": "The device is not active"}},
)
async def put_device_config(
    device_id: str,
    body: SettingsOverrides,
    request: Request,
    session: SessionDep,
    runtime: CommandsDep,
    principal: OperatorDep,
) -> DeviceConfigView:
    """Replace the device's own settings (unset ones inherit fleet defaults): a new version, sent signed."""
    await service.set_device_config(session, runtime, device_id, body, actor=principal, request=request)
    return await service.device_config(session, device_id)


@device_router.get(
    "/{device_id}/config/history", response_model=ConfigHistory, operation_id="listDeviceConfigVersions"
)
async def device_config_history(
    device_id: str,
    session: SessionDep,
    _viewer: ViewerDep,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 50,
) -> ConfigHistory:
    """The device's configuration versions, newest first."""
    return await service.device_config_history(session, device_id, limit=limit)


@router.get("/defaults", response_model=FleetDefaultsOut, operation_id="getFleetConfigDefaults")
async def get_fleet_defaults(session: SessionDep, _viewer: ViewerDep) -> FleetDefaultsOut:
    """The fleet-wide defaults every device's own settings are merged over."""
    return service.defaults_out(await service.fleet_defaults(session))


@router.put(
    "/defaults",
    response_model=FleetDefaultsOut,
    operation_id="putFleetConfigDefaults",
    responses={409: {"description": "Changed concurrently; retry"}},
)
async def put_fleet_defaults(
    body: SettingsOverrides,
    request: Request,
    session: SessionDep,
    runtime: CommandsDep,
    principal: OperatorDep,
) -> FleetDefaultsOut:
    """Replace the fleet defaults; every active device whose merged settings change gets a new version."""
    return await service.set_fleet_defaults(session, runtime, body, actor=principal, request=request)
