"""`POST /api/v1/devices/{id}/heartbeat` and `/events`: the HTTP fallback for devices without MQTT.

The body is the same signed message the device would publish (a compact JWS, content type
`application/jose`); the bearer token is the device's own JWT, and a device may post only for
itself. The heartbeat's answer carries the signed commands the device has yet to finish, so a
device that polls this way needs no broker at all. Integrators see these messages on the fleet
topics as if they had come through the broker (the API publishes them after the commit).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request

from kernex.api.auth.deps import DeviceDep
from kernex.api.commands.runtime import CommandsDep
from kernex.api.deps import SessionDep, StateDep
from kernex.api.errors import ForbiddenError
from kernex.api.fallback import service
from kernex.api.fallback.schemas import EventAccepted, HeartbeatAccepted
from kernex.protocol.topics import Topics
from kernex.protocol.verify import ClockLimits, SignedKind

router = APIRouter(prefix="/api/v1/devices", tags=["devices (device-facing)"])

_JWS_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            service.JOSE_MEDIA_TYPE: {
                "schema": {"type": "string", "description": "The signed message, compact JWS, as over MQTT"}
            }
        },
    }
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    403: {"description": "The token is another device's"},
    413: {"description": "Larger than the broker's maximum packet size"},
    415: {"description": "The body is not application/jose"},
    422: {"description": "The message failed verification; the message starts with the reason"},
}


def _clock(state: StateDep) -> ClockLimits:
    settings = state.settings
    return ClockLimits(
        max_future_skew=timedelta(seconds=settings.fallback_max_future_skew_s),
        max_age=timedelta(seconds=settings.fallback_max_age_s),
    )


def _own(caller: str, device_id: str) -> None:
    if caller != device_id:
        raise ForbiddenError("a device may post only its own messages")


@router.post(
    "/{device_id}/heartbeat",
    response_model=HeartbeatAccepted,
    operation_id="postDeviceHeartbeat",
    openapi_extra=_JWS_BODY,
    responses=_RESPONSES,
)
async def post_heartbeat(
    device_id: str,
    request: Request,
    session: SessionDep,
    state: StateDep,
    runtime: CommandsDep,
    caller: DeviceDep,
) -> HeartbeatAccepted:
    """Store a signed heartbeat (once per seq) and answer with the device's outstanding signed commands."""
    _own(caller, device_id)
    service.check_media_type(request.headers.get("content-type"))
    received = await service.receive(
        session,
        state.engine,
        device_id=device_id,
        payload=await request.body(),
        kind=SignedKind.HEARTBEAT,
        clock=_clock(state),
        max_bytes=state.settings.mqtt_max_packet_size,
    )
    await service.republish(state.broker, Topics(state.settings.topic_prefix), received.fleet)
    return HeartbeatAccepted(
        stored=received.stored,
        commands=await service.outstanding_commands(session, device_id),
        # A device without MQTT never sees the retained key set: it rides along here.
        command_key_set=runtime.keys.ring.token,
    )


@router.post(
    "/{device_id}/events",
    response_model=EventAccepted,
    operation_id="postDeviceEvent",
    openapi_extra=_JWS_BODY,
    responses=_RESPONSES,
)
async def post_event(
    device_id: str, request: Request, session: SessionDep, state: StateDep, caller: DeviceDep
) -> EventAccepted:
    """Store a signed event (deployment progress, config applied), once per seq, and apply it."""
    _own(caller, device_id)
    service.check_media_type(request.headers.get("content-type"))
    received = await service.receive(
        session,
        state.engine,
        device_id=device_id,
        payload=await request.body(),
        kind=SignedKind.EVENT,
        clock=_clock(state),
        max_bytes=state.settings.mqtt_max_packet_size,
    )
    await service.republish(state.broker, Topics(state.settings.topic_prefix), received.fleet)
    return EventAccepted(stored=received.stored)
