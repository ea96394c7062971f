"""Config commands: the typed device settings (kernex.protocol.config.DeviceSettings), applied live.

A new heartbeat interval takes effect at the next tick, a log level at once, timeouts with the
next installation; nothing needs a restart. Unknown keys are kept (persisted) but not used, so
an older agent carries a newer platform's settings without choking on them. A configuration
with a value that does not validate is not applied at all: the previous settings (and config
version) stay, and the `config_applied` event says which values were wrong (docs/protocol.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from kernex.agent.events import EventPublisher
from kernex.agent.settings import AgentSettings
from kernex.agent.state import StateStore
from kernex.agent.wakeup import Wakeup
from kernex.kit.logs import get_logger
from kernex.protocol.commands import Command, ConfigApplied, EventType
from kernex.protocol.config import DeviceSettings
from kernex.protocol.topics import CommandKind

ERROR_MAX_CHARS = 4096  # ConfigApplied.error's bound

log = get_logger(__name__)


class LiveSettings:
    """The settings a config command may change while the agent runs, read where they are used."""

    def __init__(self, settings: AgentSettings, *, set_log_level: Callable[[str], None]) -> None:
        self.heartbeat_interval_s = settings.heartbeat_interval_s
        self.log_level = settings.log_level.upper()
        self.api_timeout_s = settings.api_timeout_s
        # Until configured, a bundle's manifest alone bounds its scripts and downloads are unbounded.
        self.install_timeout_s: int | None = None
        self.download_timeout_s: int | None = None
        self.extra: dict[str, Any] = {}
        # Rung when the heartbeat interval changes, so the heartbeat loop re-plans its next tick.
        self.interval_changed = Wakeup()
        self._set_log_level = set_log_level

    def apply(self, settings: DeviceSettings) -> None:
        """Take the settings into effect."""
        interval = float(settings.heartbeat_interval_s)
        if interval != self.heartbeat_interval_s:
            log.info("heartbeat interval changed", interval_s=interval, was_s=self.heartbeat_interval_s)
            self.heartbeat_interval_s = interval
            self.interval_changed.ring()
        if settings.log_level.value != self.log_level:
            self._set_log_level(settings.log_level.value)
            log.info("log level changed", log_level=settings.log_level.value, was=self.log_level)
            self.log_level = settings.log_level.value
        self.install_timeout_s = settings.install_timeout_s
        self.download_timeout_s = settings.download_timeout_s
        self.api_timeout_s = float(settings.api_timeout_s)
        self.extra = dict(settings.extra)


class Resolved:
    """A config's values checked against DeviceSettings: all of them apply, or none."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.invalid: dict[str, str] = {}
        try:
            self.settings: DeviceSettings | None = DeviceSettings.model_validate(dict(values))
        except ValidationError as exc:
            self.settings = None
            for error in exc.errors():
                key = ".".join(str(part) for part in error["loc"]) or "values"
                self.invalid.setdefault(key, error["msg"])
        unknown = {k: v for k, v in values.items() if k not in DeviceSettings.model_fields}
        typed = self.settings.model_dump(mode="json") if self.settings is not None else {}
        # What is persisted: the typed settings as applied, unknown keys as received.
        self.persisted: dict[str, Any] = unknown | typed

    @property
    def error(self) -> str | None:
        """What the config_applied event reports, or None when the configuration applied."""
        if self.settings is not None:
            return None
        details = "; ".join(f"{key}: {message}" for key, message in self.invalid.items())
        return f"configuration not applied (the previous one stays): {details}"[:ERROR_MAX_CHARS]


class Configurator:
    """Applies config commands: persist first (revision, values, version in one write), then apply."""

    def __init__(self, store: StateStore, live: LiveSettings, events: EventPublisher) -> None:
        self._store = store
        self._live = live
        self._events = events

    def restore(self) -> None:
        """Apply the configuration persisted by an earlier run (at start, before any heartbeat)."""
        stored = self._store.state.config
        if stored is None:
            return
        resolved = Resolved(stored)
        if resolved.settings is None:
            log.error(
                "the stored configuration does not validate: using the local settings", error=resolved.error
            )
            return
        self._live.apply(resolved.settings)
        log.info("configuration restored", config_version=self._store.state.config_version)

    async def apply(self, command: Command) -> None:
        """Execute a verified config command whose revision is new."""
        body = command.config
        if body is None:  # Command guarantees the body matching its kind
            raise ValueError("a config command without a config body")
        state = self._store.state
        resolved = Resolved(body.values)
        revisions = {**state.revisions, CommandKind.CONFIG.value: command.revision}
        if resolved.settings is None:
            # Nothing applies; the revision is still used up: the same values would fail again.
            await self._store.update(revisions=revisions)
        else:
            await self._store.update(
                revisions=revisions, config=resolved.persisted, config_version=body.version
            )
            self._live.apply(resolved.settings)
        log.info(
            "config command executed",
            command_id=command.command_id,
            revision=command.revision,
            config_version=body.version,
            error=resolved.error,
        )
        await self._events.publish(
            EventType.CONFIG_APPLIED,
            ConfigApplied(command_id=command.command_id, version=body.version, error=resolved.error),
        )
