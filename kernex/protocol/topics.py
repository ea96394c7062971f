"""The MQTT topic tree (DESIGN.md "MQTT topics")."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kernex.protocol.exceptions import TopicError

DEFAULT_PREFIX = "kernex/v1"
INGEST_SHARE_GROUP = "kernex-ingest"


class Channel(StrEnum):
    """The per-device topics."""

    HEARTBEAT = "heartbeat"
    EVENTS = "events"
    STATUS = "status"
    COMMANDS = "commands"


class CommandKind(StrEnum):
    """The retained command topics under `commands/`."""

    DEPLOY = "deploy"
    CONFIG = "config"


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """A parsed per-device topic."""

    device_id: str
    channel: Channel
    command_kind: CommandKind | None = None


def _check_level(value: str, what: str) -> str:
    if not value or any(c in value for c in "/+#\x00"):
        raise TopicError(f"invalid {what} {value!r} for a topic level")
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses the Kernex topics under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or self.prefix.startswith(("/", "$")) or self.prefix.endswith("/"):
            raise TopicError(f"invalid topic prefix {self.prefix!r}")
        if any(c in self.prefix for c in "+#\x00"):
            raise TopicError(f"topic prefix {self.prefix!r} must not contain wildcards")

    def device(self, device_id: str, channel: Channel) -> str:
        """The topic of one device channel (heartbeat, events, status)."""
        return f"{self.prefix}/devices/{_check_level(device_id, 'device id')}/{channel.value}"

    def heartbeat(self, device_id: str) -> str:
        """Where a device publishes its signed heartbeats."""
        return self.device(device_id, Channel.HEARTBEAT)

    def events(self, device_id: str) -> str:
        """Where a device publishes its signed events."""
        return self.device(device_id, Channel.EVENTS)

    def status(self, device_id: str) -> str:
        """A device's retained online/offline status (its Last Will)."""
        return self.device(device_id, Channel.STATUS)

    def command(self, device_id: str, kind: CommandKind) -> str:
        """A device's retained, signed command of one kind."""
        return f"{self.device(device_id, Channel.COMMANDS)}/{kind.value}"

    def commands_filter(self, device_id: str) -> str:
        """The filter a device subscribes to for all its commands."""
        return f"{self.device(device_id, Channel.COMMANDS)}/#"

    def command_keys(self) -> str:
        """The retained, signed set of control-plane keys every device pins (one for the fleet)."""
        return f"{self.prefix}/control/command-keys"

    def all_devices(self, channel: Channel) -> str:
        """The filter matching one channel of every device."""
        return f"{self.prefix}/devices/+/{channel.value}"

    def shared(self, channel: Channel, group: str = INGEST_SHARE_GROUP) -> str:
        """An MQTT 5 shared subscription over one channel of every device."""
        return f"$share/{_check_level(group, 'share group')}/{self.all_devices(channel)}"

    def fleet(self, *levels: str) -> str:
        """A topic under the integrators' verified fleet tree."""
        return "/".join([self.prefix, "fleet", *(_check_level(v, "level") for v in levels)])

    def parse(self, topic: str) -> DeviceTopic:
        """Parse a per-device topic; raises TopicError for anything else."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            raise TopicError(f"topic {topic!r} is not under {head!r}")
        parts = topic[len(head) :].split("/")
        try:
            channel = Channel(parts[1]) if len(parts) >= 2 else None  # noqa: PLR2004 - id/channel
        except ValueError:
            channel = None
        if channel is None or not parts[0]:
            raise TopicError(f"topic {topic!r} is not a device topic")
        if channel is Channel.COMMANDS:
            if len(parts) != 3:  # noqa: PLR2004 - id/commands/kind
                raise TopicError(f"topic {topic!r} is not a command topic")
            try:
                kind = CommandKind(parts[2])
            except ValueError:
                raise TopicError(f"unknown command kind in {topic!r}") from None
            return DeviceTopic(parts[0], channel, kind)
        if len(parts) != 2:  # noqa: PLR2004 - id/channel
            raise TopicError(f"topic {topic!r} has extra levels")
        return DeviceTopic(parts[0], channel)
