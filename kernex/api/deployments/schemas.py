"""Request and response bodies of the deployments domain."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from kernex.api.rollouts.schemas import RolloutOut, RolloutStrategy
from kernex.storage.deployments import DeploymentStatus, TargetStatus

MAX_TARGETS = 10_000  # one request's device list; larger rollouts select by tag
MAX_TIMEOUT_S = 7 * 24 * 3600

Id = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=64)]
SELECTORS = ("device_ids", "tags", "group_id")


def _one_selector_schema(schema: dict[str, Any]) -> None:
    # The schema says what the validator enforces: exactly one of the selectors, not null.
    properties = schema["properties"]
    for name in SELECTORS:
        prop = properties[name]
        variants = [v for v in prop.pop("anyOf", []) if v.get("type") != "null"]
        if variants:
            prop.update(variants[0])
        prop.pop("default", None)
    schema["oneOf"] = [{"required": [name]} for name in SELECTORS]


class DeploymentCreate(BaseModel):
    """Deploy a bundle to devices named by id, to every active device carrying all the tags, or to a group.

    With a rollout strategy the devices are started in phases (kernex.api.rollouts), the selector
    evaluated again as each phase starts.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_selector_schema)

    bundle_id: Id
    device_ids: Annotated[list[Id], Field(min_length=1, max_length=MAX_TARGETS)] | None = None
    tags: Annotated[list[Tag], Field(min_length=1, max_length=32)] | None = Field(
        default=None, description="Every active device carrying all of these tags"
    )
    group_id: Id | None = Field(default=None, description="The devices of this group (static or dynamic)")
    supersede: bool = Field(
        default=False,
        description="Replace the deployments in progress on these devices instead of answering 409",
    )
    timeout_s: Annotated[int, Field(ge=1, le=MAX_TIMEOUT_S)] | None = Field(
        default=None, description="How long a device may take after it took the deployment up"
    )
    rollout: RolloutStrategy | None = Field(
        default=None, description="Start the devices in phases instead of all at once"
    )

    @model_validator(mode="after")
    def _one_selector(self) -> Self:
        if sum(getattr(self, name) is not None for name in SELECTORS) != 1:
            raise ValueError("give exactly one of device_ids, tags and group_id")
        if self.rollout is not None and self.supersede:
            raise ValueError("a rollout skips devices busy with another deployment: supersede does not apply")
        return self

    def selector(self) -> dict[str, Any]:
        """The selector given, as a rollout stores it."""
        return {name: getattr(self, name) for name in SELECTORS if getattr(self, name) is not None}


class RollbackRequest(BaseModel):
    """Roll a device back: to a given bundle, or by default to its previous successful one."""

    model_config = ConfigDict(extra="forbid")

    bundle_id: Id | None = None
    supersede: bool = False


class TargetOut(BaseModel):
    """One device's part in a deployment."""

    device_id: str
    status: TargetStatus
    error: str | None
    started_at: datetime | None
    updated_at: datetime
    finished_at: datetime | None
    command_id: str | None
    revision: int
    command_state: str | None = Field(description="pending, published, clearing, cleared or superseded")


class DeploymentOut(BaseModel):
    """A deployment with its aggregate status and counts of targets by status."""

    id: str
    bundle_id: str
    bundle_name: str
    bundle_version: str
    status: DeploymentStatus
    rollback: bool
    timeout_s: int
    created_at: datetime
    created_by: str | None
    finished_at: datetime | None
    cancelled_at: datetime | None
    cancelled_by: str | None
    total: int
    counts: dict[str, int]
    rollout: RolloutOut | None = Field(default=None, description="The phased rollout, if it is one")


class DeploymentDetail(DeploymentOut):
    """A deployment with a page of its targets (device id order)."""

    targets: list[TargetOut]
    targets_limit: int
    targets_offset: int


class DeploymentPage(BaseModel):
    """One page of deployments, newest first."""

    items: list[DeploymentOut]
    total: int
    limit: int
    offset: int


class BundleHistoryEntry(BaseModel):
    """A bundle a device ran (or tried to), from which deployment, with what result."""

    bundle_id: str
    bundle_name: str | None
    version: str
    deployment_id: str | None
    rollback: bool
    result: str
    started_at: datetime
    finished_at: datetime | None


class BundleHistory(BaseModel):
    """A device's bundle history, newest first."""

    device_id: str
    items: list[BundleHistoryEntry]
