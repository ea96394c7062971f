"""Exponential backoff with full jitter, for reconnect and retry loops."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays that double from `initial_s` up to `max_s`, each drawn with full jitter.

    Full jitter (AWS Architecture Blog, "Exponential Backoff and Jitter") spreads a fleet's
    reconnects after a broker restart instead of synchronising them into waves.
    """

    initial_s: float = 1.0
    max_s: float = 60.0
    _attempt: int = field(default=0, init=False)

    def next_delay(self) -> float:
        """The delay before the next attempt."""
        ceiling = min(self.max_s, self.initial_s * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 32)
        # Never below a tenth of the initial delay, so a loop cannot spin hot.
        return max(self.initial_s / 10, random.uniform(0, ceiling))  # noqa: S311 - jitter, not crypto

    def reset(self) -> None:
        """Start over after a success."""
        self._attempt = 0
