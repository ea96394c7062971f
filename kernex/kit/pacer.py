"""The pace of a background loop: a pass every interval, and at once when something asks."""

from __future__ import annotations

import asyncio
import contextlib


class Pacer:
    """`begin()` at the top of each pass, `wait()` at its end; `wake()` from anywhere.

    A wake during a pass is kept, so the loop runs again right after it instead of missing
    the change it was woken for.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """Ask for the next pass now."""
        self._woken.set()

    def begin(self) -> None:
        """A pass starts: what woke it is being handled."""
        self._woken.clear()

    async def wait(self) -> None:
        """Until the interval has passed or wake() was called (since the last begin())."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), timeout=self.interval_s)
