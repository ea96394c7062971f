"""Signed device events (deployment progress, config applied) into the outbox.

Events travel like heartbeats: signed with the device key (typ `kernex-event+jws`), numbered from
the same Sequence, queued in the same outbox (QoS 1, buffered while offline, sent in seq order).
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from kernex.agent.identity import Identity
from kernex.agent.outbox import Outbox, OutgoingMessage
from kernex.agent.sequence import Sequence
from kernex.kit.logs import get_logger
from kernex.protocol import jws
from kernex.protocol.commands import EventType
from kernex.protocol.messages import format_ts, utc_now
from kernex.protocol.version import PROTOCOL_VERSION

log = get_logger(__name__)


class EventPublisher:
    """Signs events of one device and queues them for its events topic."""

    def __init__(self, identity: Identity, topic: str, sequence: Sequence, outbox: Outbox) -> None:
        self._identity = identity
        self.topic = topic
        self._sequence = sequence
        self._outbox = outbox

    async def publish(
        self, event_type: EventType, data: BaseModel, *, on_delivered: Callable[[], None] | None = None
    ) -> int:
        """Queue a signed event; its seq. `on_delivered` runs once the platform acknowledged it."""
        seq = await self._sequence.next()
        # No await from here to the put: the outbox stays in seq order with the heartbeats.
        claims = {
            "device_id": self._identity.device_id,
            "seq": seq,
            "ts": format_ts(utc_now()),
            "type": event_type.value,
            "data": data.model_dump(mode="json", exclude_none=True),
            "v": PROTOCOL_VERSION,
        }
        token = jws.sign_claims(claims, self._identity.key, kid=self._identity.device_id, typ=jws.TYP_EVENT)
        self._outbox.put(
            OutgoingMessage(
                topic=self.topic, payload=token.encode("ascii"), seq=seq, on_delivered=on_delivered
            )
        )
        log.debug("event queued", type=event_type.value, seq=seq)
        return seq
