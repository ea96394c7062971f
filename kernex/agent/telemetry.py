"""Resource metrics for heartbeats, sampled with psutil off the event loop.

One sampler may serve many agents (the simulator runs thousands on one host): a sample younger
than `max_age_s` is shared instead of read again.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psutil

from kernex.protocol.messages import Metrics

MIB = 1024 * 1024
SAMPLE_MAX_AGE_S = 1.0  # host figures do not change meaningfully within a second


def read_metrics(disk_path: Path) -> Metrics:
    """Blocking: /proc reads and statvfs (which can hang on a stale network mount)."""
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(disk_path))
    return Metrics(
        # interval=None: CPU use since the previous call, without sleeping. The first call of a
        # process has no previous one and reports 0.0.
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_mb=round(memory.used / MIB, 1),
        disk_free_mb=round(disk.free / MIB, 1),
        uptime_s=round(max(0.0, time.time() - psutil.boot_time()), 1),
    )


class Telemetry:
    """Samples metrics for the filesystem holding `disk_path`, caching each sample briefly."""

    def __init__(self, disk_path: Path, *, max_age_s: float = SAMPLE_MAX_AGE_S) -> None:
        self._disk_path = disk_path
        self._max_age_s = max_age_s
        self._sample: Metrics | None = None
        self._sampled_at = 0.0
        # Concurrent callers wait for one read instead of each starting a thread.
        self._lock = asyncio.Lock()

    async def sample(self) -> Metrics:
        """Current metrics (at most `max_age_s` old)."""
        async with self._lock:
            now = time.monotonic()
            if self._sample is None or now - self._sampled_at >= self._max_age_s:
                self._sample = await asyncio.to_thread(read_metrics, self._disk_path)
                self._sampled_at = now
            return self._sample
