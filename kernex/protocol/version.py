"""The wire protocol's version, and who can talk to whom.

Compatible changes (a new optional field, a new event type) keep the version: peers ignore what
they do not know. A change an older peer would misread bumps `PROTOCOL_VERSION`. Signed messages
carry it as the claim `v`, registration answers as `protocol_version` beside the oldest agent
protocol the server still accepts (`min_protocol_version`). A message or answer without them
predates versioning and is version 1 (`LEGACY_PROTOCOL_VERSION`).

- A server accepts device messages whose `v` lies in [MIN_PROTOCOL_VERSION, PROTOCOL_VERSION]
  (old agents keep working) and rejects newer ones: it cannot know what they mean.
- An agent refuses a server that no longer accepts its version (`min_protocol_version` above
  the agent's PROTOCOL_VERSION) or that is older than MIN_PROTOCOL_VERSION, with a message that
  says which side to upgrade.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from kernex.protocol.exceptions import ProtocolError

PROTOCOL_VERSION = 1  # what this code speaks
MIN_PROTOCOL_VERSION = 1  # the oldest peer protocol this code still understands
LEGACY_PROTOCOL_VERSION = 1  # what a message without a version field means

Version = Annotated[int, Field(ge=1, le=1_000_000, strict=True)]


class IncompatibleVersionError(ProtocolError):
    """The peer speaks a protocol version this code cannot work with."""


def check_server(protocol_version: int, min_protocol_version: int) -> None:
    """Raise IncompatibleVersionError when an agent of this code cannot work with the server."""
    if min_protocol_version > PROTOCOL_VERSION:
        raise IncompatibleVersionError(
            f"the server requires agent protocol {min_protocol_version} or newer, and this agent speaks "
            f"protocol {PROTOCOL_VERSION}: upgrade the agent (pip install -U kernex)"
        )
    if protocol_version < MIN_PROTOCOL_VERSION:
        raise IncompatibleVersionError(
            f"the server speaks protocol {protocol_version}, and this agent needs {MIN_PROTOCOL_VERSION} "
            "or newer: upgrade the server before its agents"
        )


def unsupported_message_version(version: int) -> str | None:
    """Why a server of this code cannot take a device message of `version`, or None when it can."""
    if version > PROTOCOL_VERSION:
        return (
            f"message protocol version {version} is newer than this server's {PROTOCOL_VERSION}: "
            "upgrade the server before its agents"
        )
    if version < MIN_PROTOCOL_VERSION:
        return (
            f"message protocol version {version} is older than this server supports "
            f"({MIN_PROTOCOL_VERSION}): upgrade the agent"
        )
    return None
