"""Per-client rate limits, kept in this API process's memory (moving one-minute windows).

Each API process counts on its own: behind a load balancer with N processes a client gets up to
N times the limit, which still bounds abuse; a shared store can replace MemoryStorage then.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from kernex.api.errors import RateLimitedError

# One office behind NAT may hold several operators: per address, login allows this many
# times the per-username limit, so one person mistyping does not lock out the rest.
LOGIN_ADDRESS_FACTOR = 4


class RateLimits:
    """The API-wide and the login limits of one process."""

    def __init__(self, *, per_minute: int, login_per_minute: int) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._api = RateLimitItemPerMinute(per_minute, namespace="api")
        self._login = RateLimitItemPerMinute(login_per_minute, namespace="login")
        self._login_address = RateLimitItemPerMinute(
            login_per_minute * LOGIN_ADDRESS_FACTOR, namespace="login-address"
        )

    def _hit(self, item: RateLimitItemPerMinute, *keys: str, what: str) -> None:
        if self._limiter.hit(item, *keys):
            return
        reset_at = self._limiter.get_window_stats(item, *keys).reset_time
        raise RateLimitedError(
            f"too many {what}; retry later", retry_after_s=math.ceil(reset_at - time.time())
        )

    def check_request(self, address: str) -> None:
        """Count one API request from the address; RateLimitedError past the limit."""
        self._hit(self._api, address, what="requests")

    def check_login(self, address: str, username: str) -> None:
        """Count one login attempt; RateLimitedError past the per-username or per-address limit."""
        self._hit(self._login_address, address, what="login attempts")
        self._hit(self._login, address, username.lower(), what="login attempts")
