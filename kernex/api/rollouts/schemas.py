"""Request and response bodies of phased rollouts: the strategy, the rollout's view, the dry run."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, time, timedelta
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kernex.api.auth.schemas import StrictBody
from kernex.storage.deployments import RolloutState

MAX_PHASES = 20
MAX_SOAK_S = 7 * 24 * 3600
DAY = timedelta(days=1)


def _one_size_schema(schema: dict[str, Any]) -> None:
    # The schema says what the validator enforces: exactly one of percent and devices, not null.
    for name in ("percent", "devices"):
        prop = schema["properties"][name]
        variants = [v for v in prop.pop("anyOf", []) if v.get("type") != "null"]
        if variants:
            prop.update(variants[0])
        prop.pop("default", None)
    schema["oneOf"] = [{"required": ["percent"]}, {"required": ["devices"]}]


class Phase(StrictBody):
    """One phase: a cumulative percentage of the selected devices, or a fixed batch of more devices."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_size_schema)
    name: str | None = Field(default=None, max_length=64)
    percent: Annotated[float, Field(gt=0, le=100)] | None = Field(
        default=None, description="Devices covered once this phase started, as a share of those selected then"
    )
    devices: Annotated[int, Field(ge=1, le=1_000_000)] | None = Field(
        default=None, description="How many more devices this phase starts"
    )

    @model_validator(mode="after")
    def _one_size(self) -> Self:
        if (self.percent is None) == (self.devices is None):
            raise ValueError("a phase gives exactly one of percent and devices")
        return self


class RateLimit(StrictBody):
    """At most `devices` deploy commands issued per `period_s` seconds (default: per minute)."""

    devices: int = Field(ge=1, le=1_000_000)
    period_s: int = Field(default=60, ge=1, le=86_400)


class MaintenanceWindow(StrictBody):
    """A daily window (UTC) in which commands are issued; they expire when it closes.

    `end` before `start` wraps past midnight; `weekdays` (0 = Monday) are the days it opens on.
    A time given with an offset is converted to UTC.
    """

    start: time
    end: time
    weekdays: Annotated[list[Annotated[int, Field(ge=0, le=6)]], Field(min_length=1, max_length=7)] | None = (
        None
    )

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        self.start, self.end = _utc(self.start), _utc(self.end)
        if self.start == self.end:
            raise ValueError("a maintenance window needs start and end to differ")
        return self

    def closes_at(self, now: datetime) -> datetime | None:
        """When the window open at `now` closes; None if it is closed at `now`."""
        now = now.astimezone(UTC)
        # A window that opened yesterday (and wraps past midnight) may still be open.
        for opened_day in (now.date(), now.date() - DAY):
            opens = datetime.combine(opened_day, self.start, tzinfo=UTC)
            closes = datetime.combine(opened_day, self.end, tzinfo=UTC)
            if closes <= opens:
                closes += DAY
            weekday_ok = self.weekdays is None or opens.weekday() in self.weekdays
            if weekday_ok and opens <= now < closes:
                return closes
        return None


def _utc(moment: time) -> time:
    if moment.tzinfo is None:
        return moment
    # Any day will do: the offset of a fixed-offset time does not depend on the date.
    anchored = datetime.combine(datetime(2000, 1, 3, tzinfo=UTC).date(), moment)
    return anchored.astimezone(UTC).time().replace(tzinfo=None)


class AbortCriteria(StrictBody):
    """When the rollout stops by itself; and whether the devices it updated are then rolled back."""

    after_failures: int | None = Field(default=None, ge=1, description="Abort once this many devices failed")
    after_failure_percent: Annotated[float, Field(gt=0, le=100)] | None = Field(
        default=None, description="Abort once this share of finished devices failed (over min_finished)"
    )
    min_finished: int = Field(default=1, ge=1, description="Finished devices before the percentage counts")
    after_unhealthy: int | None = Field(
        default=None,
        ge=1,
        description="Abort once this many updated devices went offline or unhealthy within the soak time",
    )
    rollback: bool = Field(
        default=False, description="On abort, roll the devices it updated back to their previous bundle"
    )


class RolloutStrategy(StrictBody):
    """How a deployment rolls out: phases, when each may start, how fast, when, and when to stop."""

    phases: Annotated[list[Phase], Field(min_length=1, max_length=MAX_PHASES)]
    success_threshold_percent: float = Field(
        default=100, gt=0, le=100, description="Share of a phase's devices that must succeed before the next"
    )
    soak_s: int = Field(
        default=0,
        ge=0,
        le=MAX_SOAK_S,
        description="After the threshold, how long the phase's devices must keep sending healthy heartbeats",
    )
    require_approval: bool = Field(default=False, description="Wait for POST .../approve between phases")
    rate_limit: RateLimit | None = None
    maintenance_window: MaintenanceWindow | None = None
    abort: AbortCriteria = Field(default_factory=AbortCriteria)

    @model_validator(mode="after")
    def _percentages_grow(self) -> Self:
        shares = [p.percent for p in self.phases if p.percent is not None]
        if any(b <= a for a, b in itertools.pairwise(shares)):
            raise ValueError("phase percentages are cumulative: each must be larger than the one before")
        return self


class PhaseOut(BaseModel):
    """One phase as planned, and its devices' statuses once it started."""

    index: int
    name: str | None
    percent: float | None
    devices: int | None
    state: str = Field(description="waiting, running, soaking, passed or stopped")
    total: int
    counts: dict[str, int]


class TransitionOut(BaseModel):
    """One recorded step of the rollout."""

    at: datetime
    event: str
    state: RolloutState
    phase: int | None
    actor: str
    reason: str | None
    details: dict[str, Any]


class RolloutOut(BaseModel):
    """Where a rollout stands: its state, current phase, why it stopped, and its strategy."""

    state: RolloutState
    phase: int
    phases_total: int
    phase_started_at: datetime | None
    phase_passed_at: datetime | None
    stop_reason: str | None
    stopped_at: datetime | None
    selector: dict[str, Any]
    strategy: RolloutStrategy


class RolloutDetail(RolloutOut):
    """The rollout with each phase's counts and every transition, oldest first."""

    deployment_id: str
    phases: list[PhaseOut]
    transitions: list[TransitionOut]


class PhasePreview(BaseModel):
    """The devices one phase would start, were the rollout created now."""

    index: int
    name: str | None
    devices: list[str]


class RolloutPreview(BaseModel):
    """A dry run: which devices each phase would touch, evaluated now (dynamic groups may grow)."""

    selected: int = Field(description="Active devices the selector names now")
    busy: list[str] = Field(description="Selected devices with another deployment in progress: skipped")
    phases: list[PhasePreview]
    maintenance_window_open: bool | None
