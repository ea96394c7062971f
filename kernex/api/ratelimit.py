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

    def __init__(self, *, per_minute: int, login_per_minute: int, device_address_per_minute: int) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._api = RateLimitItemPerMinute(per_minute, namespace="api")
        self._device = RateLimitItemPerMinute(per_minute, namespace="device")
        self._device_address = RateLimitItemPerMinute(device_address_per_minute, namespace="device-address")
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

    def check_request(self, address: str, device: str | None = None) -> None:
        """Count one API request; RateLimitedError past the limit.

        A device's request (`device` is the id it names) counts against that device, so a fleet
        behind one NAT address is not limited as if it were one client; the address still has a
        ceiling for all the device requests it sends, which bounds a client naming random ids.
        """
        if device is None:
            self._hit(self._api, address, what="requests")
            return
        self._hit(self._device_address, address, what="device requests from this address")
        self._hit(self._device, address, device, what="requests from this device")

    def check_login(self, address: str, username: str) -> None:
        """Count one login attempt; RateLimitedError past the per-username or per-address limit."""
        self._hit(self._login_address, address, what="login attempts")
        self._hit(self._login, address, username.lower(), what="login attempts")
