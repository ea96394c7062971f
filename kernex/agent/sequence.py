"""The per-device message counter: strictly increasing across restarts, without an fsync per message.

The counter reserves numbers in blocks: before handing out the first number of a block it persists
the block's end as `seq_reserved`. After a crash the agent continues from that mark, so numbers may
be skipped (gaps are fine) but never repeated (ingest stores each (device_id, seq) once).
"""

from __future__ import annotations

import asyncio

from kernex.agent.state import StateStore

SEQ_BLOCK = 100  # one state write per 100 messages: under two hours of heartbeats at 60 s
FIRST_SEQ = 1  # a fresh device's first message; 0 stays free as "nothing sent yet"


class Sequence:
    """Hands out heartbeat and event sequence numbers for one device."""

    def __init__(self, store: StateStore, *, block: int = SEQ_BLOCK) -> None:
        if block < 1:
            raise ValueError("the reservation block must hold at least one number")
        self._store = store
        self._block = block
        self._reserved = store.state.seq_reserved
        self._next = max(self._reserved, FIRST_SEQ)
        self._lock = asyncio.Lock()
        self.last: int | None = None

    async def next(self) -> int:
        """The next number; persists a new reservation first when the current block is used up."""
        async with self._lock:
            if self._next >= self._reserved:
                reserved = self._next + self._block
                await self._store.update(seq_reserved=reserved)
                self._reserved = reserved
            value = self._next
            self._next += 1
            self.last = value
            return value
