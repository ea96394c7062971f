"""What integrators read on `<prefix>/fleet/...`: verified, normalized device events.

Ingest republishes a device message here only after the batch holding it committed, so only
verified data ever appears (DESIGN.md "MQTT topics"). Payloads are plain JSON (not the device's
JWS): integrators trust the broker and the platform's verification, not device keys.

Delivery is at least once: a message republished just before a crash is republished again when
the broker redelivers the device message. Integrators deduplicate heartbeats and events by
(device_id, seq), keeping the first copy as the database does, and status changes by
(device_id, status, ts).

Rollout progress goes to `<prefix>/fleet/rollouts/{deployment_id}` (retained: the last one is
where the rollout stands), one message per recorded transition, deduplicated by
(deployment_id, transition_id).

Topics, under `<prefix>/fleet/devices/{device_id}/`:
- `heartbeat`: every stored heartbeat (metrics, bundle, config version);
- `status`: a change of the device's connection state (online/offline), as stored;
- `deployments`: deployment progress events (`type` = "deployment");
- `config`: config-applied events (`type` = "config_applied");
- `events`: any other device event type.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from kernex.protocol.commands import EventType
from kernex.protocol.messages import BundleRef, Metrics
from kernex.protocol.topics import Topics

FLEET_QOS = 1  # as every Kernex topic: integrators get each message at least once


class FleetChannel(StrEnum):
    """The last level of a fleet topic."""

    HEARTBEAT = "heartbeat"
    STATUS = "status"
    DEPLOYMENTS = "deployments"
    CONFIG = "config"
    EVENTS = "events"


def event_channel(event_type: str) -> FleetChannel:
    """Which fleet topic carries a device event of this type."""
    if event_type == EventType.DEPLOYMENT.value:
        return FleetChannel.DEPLOYMENTS
    if event_type == EventType.CONFIG_APPLIED.value:
        return FleetChannel.CONFIG
    return FleetChannel.EVENTS


def fleet_topic(topics: Topics, device_id: str, channel: FleetChannel) -> str:
    """`<prefix>/fleet/devices/{device_id}/{channel}`."""
    return topics.fleet("devices", device_id, channel.value)


def fleet_filter(topics: Topics) -> str:
    """The filter an integrator subscribes to for everything: `<prefix>/fleet/#`."""
    return f"{topics.prefix}/fleet/#"


class _Fleet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FleetHeartbeat(_Fleet):
    """A stored heartbeat, as its device signed it, plus when the platform received it."""

    type: Literal["heartbeat"] = "heartbeat"
    device_id: str
    seq: Annotated[int, Field(ge=0)]
    ts: AwareDatetime
    received_at: AwareDatetime
    status: str
    metrics: Metrics
    bundle: BundleRef | None
    config_version: int | None
    agent_version: str


class FleetStatus(_Fleet):
    """A change of a device's connection state, as the platform recorded it."""

    type: Literal["status"] = "status"
    device_id: str
    status: Literal["online", "offline", "revoked"]
    ts: AwareDatetime  # when the change happened (DESIGN.md: newest ts wins, not arrival order)
    reason: str  # what told the platform: "status message", "heartbeat", ...


class FleetEvent(_Fleet):
    """A stored device event: deployment progress, config applied, or another type."""

    type: str
    device_id: str
    seq: Annotated[int, Field(ge=0)]
    ts: AwareDatetime
    received_at: AwareDatetime
    data: dict[str, Any]


FleetMessage = FleetHeartbeat | FleetStatus | FleetEvent

ROLLOUTS_EVENT = "rollouts"  # the webhook event type of rollout progress


class FleetRollout(_Fleet):
    """A rollout step as the platform recorded it, with the deployment's target counts when sent."""

    type: Literal["rollout"] = "rollout"
    deployment_id: str
    transition_id: Annotated[int, Field(ge=1)]  # grows with every step of every rollout
    event: str  # created, phase_started, phase_passed, awaiting_approval, approved, aborted, ...
    at: AwareDatetime
    state: str  # the rollout's state after the step: running, awaiting_approval, completed, ...
    phase: int | None  # the phase the step concerns (0-based), None for the rollout as a whole
    phases_total: Annotated[int, Field(ge=1)]
    actor: str
    reason: str | None  # why it stopped, for an abort or cancel
    counts: dict[str, int]  # the deployment's targets by status when the message was sent


def rollout_topic(topics: Topics, deployment_id: str) -> str:
    """`<prefix>/fleet/rollouts/{deployment_id}`."""
    return topics.fleet("rollouts", deployment_id)


def encode(message: FleetMessage | FleetRollout) -> bytes:
    """The UTF-8 JSON payload of a fleet message."""
    return message.model_dump_json().encode("utf-8")
