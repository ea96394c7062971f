"""`/api/v1/devices`: registration (devices) and the fleet read side (operators)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import AwareDatetime

from kernex.api.audit import service as audit
from kernex.api.auth.deps import DeviceDep, OperatorDep, require_viewer
from kernex.api.bundles.runtime import KeyringDep
from kernex.api.commands.runtime import CommandsDep
from kernex.api.configs import service as configs
from kernex.api.deps import PKIDep, SessionDep, SettingsDep
from kernex.api.devices import service
from kernex.api.devices.revocation import revoke
from kernex.api.devices.schemas import (
    CertificateRenewal,
    DeviceDetail,
    DeviceOut,
    DevicePage,
    DeviceSort,
    FleetStats,
    HeartbeatOut,
    HeartbeatPage,
    RenewedCertificate,
    RevocationOut,
)
from kernex.api.errors import ApiError, ForbiddenError
from kernex.protocol.messages import RegistrationRequest, RegistrationResponse
from kernex.storage.models import AdmissionState, ConnectionState

PAGE_MAX = 500  # bounds one response's size and query cost

# Devices call this; the CSR's signature is their proof of possession.
device_router = APIRouter(prefix="/api/v1/devices", tags=["devices (device-facing)"])
# Operator routes: any authenticated operator-side caller (viewer and up) may read the fleet.
router = APIRouter(prefix="/api/v1/devices", tags=["devices"], dependencies=[Depends(require_viewer)])


@device_router.post(
    "/register",
    response_model=RegistrationResponse,
    status_code=status.HTTP_201_CREATED,
    operation_id="registerDevice",
    responses={200: {"model": RegistrationResponse, "description": "The key was already registered"}},
)
async def register_device(
    body: RegistrationRequest,
    response: Response,
    session: SessionDep,
    pki: PKIDep,
    settings: SettingsDep,
    release_keys: KeyringDep,
    commands: CommandsDep,
) -> RegistrationResponse:
    """Register a device by CSR: 201 the first time, 200 for a key already registered."""
    result, created = await service.register(
        session, pki, settings, body, release_keys=release_keys.public_keys()
    )
    if result.status == "active":
        # A new device starts from the fleet's configuration defaults, when there are any.
        await configs.ensure_fleet_defaults(session, commands, result.device_id)
    if not created:
        response.status_code = status.HTTP_200_OK
    return result


@router.get("", response_model=DevicePage, operation_id="listDevices")
async def list_devices(
    session: SessionDep,
    status: ConnectionState | None = None,
    state: AdmissionState | None = None,
    q: Annotated[str | None, Query(max_length=128, description="Search by name or id")] = None,
    sort: DeviceSort = DeviceSort.REGISTERED,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> DevicePage:
    """Devices, newest first or in the `sort` order, filtered by status and admission state, searchable."""
    devices, total = await service.list_devices(
        session, status=status, state=state, search=q, sort=sort, limit=limit, offset=offset
    )
    return DevicePage(items=[service.to_out(d) for d in devices], total=total, limit=limit, offset=offset)


@router.get("/stats", response_model=FleetStats, operation_id="fleetStats")
async def fleet_stats(session: SessionDep) -> FleetStats:
    """Totals for the fleet overview."""
    return await service.stats(session)


@router.get("/{device_id}", response_model=DeviceDetail, operation_id="getDevice")
async def get_device(device_id: str, session: SessionDep) -> DeviceDetail:
    """One device with its latest state."""
    return service.to_detail(await service.get_device(session, device_id))


@router.get("/{device_id}/heartbeats", response_model=HeartbeatPage, operation_id="listHeartbeats")
async def list_heartbeats(
    device_id: str,
    session: SessionDep,
    since: Annotated[AwareDatetime | None, Query(description="Only heartbeats at or after this time")] = None,
    until: Annotated[
        AwareDatetime | None,
        Query(description="Only heartbeats before this time: pass a page's oldest ts for the next page"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 100,
) -> HeartbeatPage:
    """A device's heartbeats, newest first."""
    rows = await service.heartbeats(session, device_id, since=since, until=until, limit=limit)
    return HeartbeatPage(device_id=device_id, items=[HeartbeatOut.model_validate(r) for r in rows])


async def _decide(
    verb: str, device_id: str, operator: OperatorDep, request: Request, session: SessionDep
) -> DeviceOut:
    action = service.accept if verb == "accept" else service.reject
    target = f"device:{device_id}"
    try:
        device = await action(session, device_id)
    except ApiError as exc:
        await audit.record(
            session,
            actor=operator,
            action=f"device.{verb}",
            target=target,
            outcome="failed",
            request=request,
            details={"error": exc.code},
        )
        raise
    await audit.record(
        session, actor=operator, action=f"device.{verb}", target=target, outcome="success", request=request
    )
    return service.to_out(device)


@router.post("/{device_id}/accept", response_model=DeviceOut, operation_id="acceptDevice")
async def accept_device(
    device_id: str, operator: OperatorDep, request: Request, session: SessionDep
) -> DeviceOut:
    """Admit a pending (or rejected) device; its agent gets its certificate at its next poll."""
    return await _decide("accept", device_id, operator, request, session)


@router.post("/{device_id}/reject", response_model=DeviceOut, operation_id="rejectDevice")
async def reject_device(
    device_id: str, operator: OperatorDep, request: Request, session: SessionDep
) -> DeviceOut:
    """Refuse a pending device: it never gets a certificate, and its agent stops."""
    return await _decide("reject", device_id, operator, request, session)


@router.post("/{device_id}/revoke", response_model=RevocationOut, operation_id="revokeDevice")
async def revoke_device(
    device_id: str,
    operator: OperatorDep,
    request: Request,
    session: SessionDep,
    pki: PKIDep,
    settings: SettingsDep,
    commands: CommandsDep,
) -> RevocationOut:
    """Decommission a device: certificate in the CRL, broker reloaded, session cut, commands cleared."""
    target = f"device:{device_id}"
    try:
        done = await revoke(session, pki, settings, commands, device_id)
    except ApiError as exc:
        await audit.record(
            session,
            actor=operator,
            action="device.revoke",
            target=target,
            outcome="failed",
            request=request,
            details={"error": exc.code},
        )
        raise
    result = RevocationOut(
        device=service.to_out(done.device),
        crl_serial=done.crl_serial,
        broker_reloaded=done.broker_reloaded_pid is not None,
        session_cut=done.session_cut,
        cleared_commands=done.cleared_commands,
        errors=list(done.errors),
    )
    await audit.record(
        session,
        actor=operator,
        action="device.revoke",
        target=target,
        outcome="success",
        request=request,
        details=result.model_dump(exclude={"device"}),
    )
    return result


async def _own_device(device_id: str, caller: DeviceDep) -> str:
    # A dependency, so the refusal comes before the body is validated.
    if caller != device_id:
        raise ForbiddenError("a device may renew only its own certificate")
    return caller


@device_router.post(
    "/{device_id}/certificate", response_model=RenewedCertificate, operation_id="renewCertificate"
)
async def renew_certificate(
    device_id: Annotated[str, Depends(_own_device)],
    body: CertificateRenewal,
    request: Request,
    session: SessionDep,
    pki: PKIDep,
    settings: SettingsDep,
) -> RenewedCertificate:
    """A new certificate for the calling device (its own JWT): same key renews, a new key rotates."""
    renewed = await service.renew_certificate(session, pki, settings, device_id, body.csr)
    await audit.record(
        session,
        actor=f"device:{device_id}",
        action="device.key.rotate" if renewed.rotated else "device.certificate.renew",
        target=f"device:{device_id}",
        outcome="success",
        request=request,
        details={"not_after": renewed.not_after.isoformat()},
    )
    return renewed
