"""Request and response bodies of the groups domain: device tags, static and dynamic groups."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from kernex.api.admission.schemas import Tag, Tags
from kernex.api.apitokens.schemas import NAME_PATTERN
from kernex.api.auth.schemas import StrictBody
from kernex.api.devices.schemas import DeviceOut
from kernex.storage.models import ConnectionState

MAX_MEMBERS_PER_REQUEST = 10_000  # one request's device list
MAX_CRITERION_VALUES = 64  # values one filter criterion lists
NO_BUNDLE = "none"  # the bundle version a filter names for devices that reported none

Id = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]
Values = Annotated[list[ShortText], Field(min_length=1, max_length=MAX_CRITERION_VALUES)]


def _non_null(schema: dict[str, Any], names: tuple[str, ...]) -> None:
    # Optional fields may be left out, not sent as null: the schema says so.
    for name in names:
        prop = schema["properties"][name]
        variants = [v for v in prop.pop("anyOf", []) if v.get("type") != "null"]
        if variants:
            prop.update(variants[0])
        prop.pop("default", None)


def _filter_schema(schema: dict[str, Any]) -> None:
    _non_null(schema, tuple(schema["properties"]))
    schema["minProperties"] = 1


def _create_schema(schema: dict[str, Any]) -> None:
    # What the validator enforces: a dynamic group has a filter and no device_ids, a static one no filter.
    _non_null(schema, ("filter", "device_ids"))
    schema["oneOf"] = [
        {
            "properties": {"kind": {"const": "dynamic"}},
            "required": ["filter"],
            "not": {"required": ["device_ids"]},
        },
        {"properties": {"kind": {"const": "static"}}, "not": {"required": ["filter"]}},
    ]


class GroupKind(StrEnum):
    """How a group's members are decided."""

    STATIC = "static"  # the devices an operator listed
    DYNAMIC = "dynamic"  # the devices its filter matches when it is evaluated


class GroupFilter(StrictBody):
    """A saved filter over devices; a device matches when it meets every criterion given.

    Only active (admitted, not revoked) devices are ever members.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=_filter_schema)

    tags_all: Annotated[list[Tag], Field(min_length=1, max_length=32)] | None = Field(
        default=None, description="The device carries every one of these tags"
    )
    tags_any: Annotated[list[Tag], Field(min_length=1, max_length=32)] | None = Field(
        default=None, description="The device carries at least one of these tags"
    )
    status: Annotated[list[ConnectionState], Field(min_length=1, max_length=3)] | None = Field(
        default=None, description="Its connection status when the group is evaluated"
    )
    bundle_versions: Values | None = Field(
        default=None, description=f'The bundle version it reports ("{NO_BUNDLE}": none reported)'
    )
    device_types: Values | None = Field(
        default=None, description="The device type its agent reported at registration"
    )

    @model_validator(mode="after")
    def _some_criterion(self) -> Self:
        if not self.model_dump(exclude_none=True):
            raise ValueError("a filter needs at least one criterion (an empty one would match every device)")
        return self


class GroupCreate(StrictBody):
    """A static group (optionally with its first members) or a dynamic group (with its filter)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_create_schema)

    name: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)
    kind: GroupKind
    description: str | None = Field(default=None, max_length=512)
    filter: GroupFilter | None = Field(default=None, description="Dynamic groups only")
    device_ids: Annotated[list[Id], Field(max_length=MAX_MEMBERS_PER_REQUEST)] | None = Field(
        default=None, description="Static groups only: the first members"
    )

    @model_validator(mode="after")
    def _fits_kind(self) -> Self:
        if self.kind is GroupKind.DYNAMIC and (self.filter is None or self.device_ids is not None):
            raise ValueError("a dynamic group takes a filter and no device_ids")
        if self.kind is GroupKind.STATIC and self.filter is not None:
            raise ValueError("a static group takes device_ids, not a filter")
        return self


class GroupUpdate(StrictBody):
    """Rename a group, describe it, or replace a dynamic group's filter."""

    name: str | None = Field(default=None, min_length=1, max_length=128, pattern=NAME_PATTERN)
    description: str | None = Field(default=None, max_length=512)
    filter: GroupFilter | None = None


class MembersChange(StrictBody):
    """Devices to add to a static group."""

    device_ids: Annotated[list[Id], Field(min_length=1, max_length=MAX_MEMBERS_PER_REQUEST)]


class TagsUpdate(StrictBody):
    """A device's tags, replacing the ones it has."""

    tags: Tags


class GroupOut(BaseModel):
    """A group and how many active devices it holds now."""

    id: str
    name: str
    kind: GroupKind
    description: str | None
    filter: dict[str, Any] | None = Field(description="A dynamic group's filter: the criteria it was given")
    size: int = Field(description="Active devices in the group now (a dynamic group evaluated now)")
    created_at: datetime
    created_by: str | None
    updated_at: datetime


class GroupPage(BaseModel):
    """Groups by name."""

    items: list[GroupOut]
    total: int
    limit: int
    offset: int


class GroupDevices(BaseModel):
    """A page of the group's devices now, by id."""

    group_id: str
    items: list[DeviceOut]
    total: int
    limit: int
    offset: int
