"""Config commands: the typed device settings (kernex.protocol.config.DeviceSettings), applied live.

A new heartbeat interval takes effect at the next tick, a log level at once, timeouts with the
next installation; nothing needs a restart. Unknown keys are kept (persisted) but not used, so
an older agent carries a newer platform's settings without choking on them. A value that does
not validate is not applied (the previous one stays) and the `config_applied` event says which.
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

    def apply(self, settings: DeviceSettings, *, keep: frozenset[str] = frozenset()) -> None:
        """Take the settings (but those named in `keep`, which stay as they are) into effect."""
        if "heartbeat_interval_s" not in keep:
            interval = float(settings.heartbeat_interval_s)
            if interval != self.heartbeat_interval_s:
                log.info("heartbeat interval changed", interval_s=interval, was_s=self.heartbeat_interval_s)
                self.heartbeat_interval_s = interval
                self.interval_changed.ring()
        if "log_level" not in keep and settings.log_level.value != self.log_level:
            self._set_log_level(settings.log_level.value)
            log.info("log level changed", log_level=settings.log_level.value, was=self.log_level)
            self.log_level = settings.log_level.value
        if "install_timeout_s" not in keep:
            self.install_timeout_s = settings.install_timeout_s
        if "download_timeout_s" not in keep:
            self.download_timeout_s = settings.download_timeout_s
        if "api_timeout_s" not in keep:
            self.api_timeout_s = float(settings.api_timeout_s)
        if "extra" not in keep:
            self.extra = dict(settings.extra)


class Resolved:
    """A config's values checked against DeviceSettings."""

    def __init__(self, values: Mapping[str, Any], previous: Mapping[str, Any] | None) -> None:
        self.invalid: dict[str, str] = {}
        try:
            self.settings: DeviceSettings | None = DeviceSettings.model_validate(dict(values))
        except ValidationError as exc:
            for error in exc.errors():
                key = str(error["loc"][0]) if error["loc"] else "values"
                self.invalid.setdefault(key, error["msg"])
            # The valid values apply; an invalid one keeps what was applied before.
            kept = {k: previous[k] for k in self.invalid if previous is not None and k in previous}
            usable = {k: v for k, v in values.items() if k not in self.invalid} | kept
            try:
                self.settings = DeviceSettings.model_validate(usable)
            except ValidationError:
                self.settings = None
        unknown = {k: v for k, v in values.items() if k not in DeviceSettings.model_fields}
        typed = self.settings.model_dump(mode="json") if self.settings is not None else {}
        # What is persisted: the typed settings as applied, unknown keys as received.
        self.persisted: dict[str, Any] = unknown | typed

    @property
    def error(self) -> str | None:
        """What the config_applied event reports, or None when every value applied."""
        if self.settings is None:
            text = "configuration refused: " + "; ".join(f"{k}: {m}" for k, m in self.invalid.items())
        elif self.invalid:
            text = "invalid values not applied (previous values kept): " + "; ".join(
                f"{k}: {m}" for k, m in self.invalid.items()
            )
        else:
            return None
        return text[:ERROR_MAX_CHARS]


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
        resolved = Resolved(stored, None)
        if resolved.settings is None:
            log.error(
                "the stored configuration does not validate: using the local settings", error=resolved.error
            )
            return
        self._live.apply(resolved.settings, keep=frozenset(resolved.invalid))
        log.info("configuration restored", config_version=self._store.state.config_version)

    async def apply(self, command: Command) -> None:
        """Execute a verified config command whose revision is new."""
        body = command.config
        if body is None:  # Command guarantees the body matching its kind
            raise ValueError("a config command without a config body")
        state = self._store.state
        resolved = Resolved(body.values, state.config)
        revisions = {**state.revisions, CommandKind.CONFIG.value: command.revision}
        if resolved.settings is None:
            # Nothing applies; the revision is still used up so the command is not retried forever.
            await self._store.update(revisions=revisions)
        else:
            await self._store.update(
                revisions=revisions, config=resolved.persisted, config_version=body.version
            )
            self._live.apply(resolved.settings, keep=frozenset(resolved.invalid))
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
