"""A doorbell for one waiting task: `ring()` from anywhere on the loop, `wait(timeout)` in the task.

A ring is remembered until the next `wait`, so one that comes while the task is busy is not lost.
`wait` uses `asyncio.wait` on a future, never `asyncio.wait_for` or `asyncio.timeout`: on Python
3.11 those can swallow a cancellation that races the wake-up (see kernex.agent.agent).
"""

from __future__ import annotations

import asyncio


class Wakeup:
    """Wakes one task early from a timed wait."""

    def __init__(self) -> None:
        self._rung = False
        self._waiter: asyncio.Future[None] | None = None

    def ring(self) -> None:
        """Wake the waiting task now, or make its next wait return at once."""
        self._rung = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout: float | None) -> bool:  # noqa: ASYNC109 - asyncio.timeout is the 3.11 pitfall avoided here
        """Wait until rung or `timeout` seconds passed (None: no limit); whether it was rung."""
        if not self._rung:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await asyncio.wait({waiter}, timeout=timeout)
            finally:
                self._waiter = None
                waiter.cancel()
        rung, self._rung = self._rung, False
        return rung
