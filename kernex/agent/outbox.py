"""The bounded buffer between producing messages and publishing them.

Producers never wait for the broker: while the agent is disconnected messages accumulate here,
and when it is full the oldest are dropped (the newest state matters most to an operator).
A publish that fails mid-flight goes back in its place (by seq), so order is kept across
reconnects and across switching between MQTT and the HTTP fallback.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kernex.kit.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message ready for the broker."""

    topic: str
    payload: bytes
    seq: int | None = None
    qos: int = 1
    retain: bool = False
    # Called once the broker (or the API) has acknowledged the message; must not block.
    on_delivered: Callable[[], None] | None = None

    def delivered(self) -> None:
        """Run the delivery callback; a callback fault is logged, never raised into the sender."""
        if self.on_delivered is None:
            return
        try:
            self.on_delivered()
        except Exception:  # the sender must keep sending whatever a callback does
            log.exception("delivery callback failed", topic=self.topic, seq=self.seq)


class Outbox:
    """A FIFO of at most `capacity` messages that drops the oldest when full."""

    def __init__(self, capacity: int, *, on_put: Callable[[], None] | None = None) -> None:
        """`on_put` is called after each new message is queued (it must not block)."""
        if capacity < 1:
            raise ValueError("the outbox must hold at least one message")
        self.capacity = capacity
        self.dropped = 0
        self._queue: deque[OutgoingMessage] = deque()
        self._ready = asyncio.Event()
        self._on_put = on_put

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, message: OutgoingMessage) -> None:
        """Append a new message, dropping the oldest if the buffer is full."""
        if len(self._queue) >= self.capacity:
            self._drop(self._queue.popleft())
        self._queue.append(message)
        self._ready.set()
        if self._on_put is not None:
            self._on_put()

    def put_back(self, message: OutgoingMessage) -> None:
        """Return a message whose sending failed to its place: before every later seq."""
        position = 0
        if message.seq is not None:
            while position < len(self._queue) and (self._queue[position].seq or 0) < message.seq:
                position += 1
        if len(self._queue) >= self.capacity and position == 0:
            # It is the oldest message, so the drop-oldest rule drops it.
            self._drop(message)
            return
        self._queue.insert(position, message)
        if len(self._queue) > self.capacity:
            self._drop(self._queue.popleft())
        self._ready.set()

    def take_first(self, wanted: Callable[[OutgoingMessage], bool]) -> OutgoingMessage | None:
        """Remove and return the oldest message `wanted` accepts, without waiting; None if none."""
        for position, message in enumerate(self._queue):
            if wanted(message):
                del self._queue[position]
                return message
        return None

    async def get(self) -> OutgoingMessage:
        """Remove and return the oldest message, waiting for one if the buffer is empty."""
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    def _drop(self, message: OutgoingMessage) -> None:
        self.dropped += 1
        log.warning(
            "outbox full: dropped the oldest message",
            topic=message.topic,
            seq=message.seq,
            dropped_total=self.dropped,
            capacity=self.capacity,
        )
