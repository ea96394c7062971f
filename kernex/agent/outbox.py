"""The bounded buffer between producing messages and publishing them.

Producers never wait for the broker: while the agent is disconnected messages accumulate here,
and when it is full the oldest are dropped (the newest state matters most to an operator).
A publish that fails mid-flight goes back to the front, so order is kept across reconnects.
"""

from __future__ import annotations

import asyncio
from collections import deque
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


class Outbox:
    """A FIFO of at most `capacity` messages that drops the oldest when full."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the outbox must hold at least one message")
        self.capacity = capacity
        self.dropped = 0
        self._queue: deque[OutgoingMessage] = deque()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, message: OutgoingMessage) -> None:
        """Append a new message, dropping the oldest if the buffer is full."""
        if len(self._queue) >= self.capacity:
            self._drop(self._queue.popleft())
        self._queue.append(message)
        self._ready.set()

    def put_back(self, message: OutgoingMessage) -> None:
        """Return a message whose publish failed to the front (it is older than everything queued)."""
        if len(self._queue) >= self.capacity:
            # It is the oldest message, so the drop-oldest rule drops it.
            self._drop(message)
            return
        self._queue.appendleft(message)
        self._ready.set()

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
