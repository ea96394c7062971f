"""Many simulated devices in one process, each a real Agent: own key, own state dir, own mTLS session.

Used by `kernex simulate` and `kernex up --devices N`. The per-device cost is one Agent (a few
tasks, an MQTT socket); the HTTP connection pool and the host metrics sampler are shared.

Simulated devices obey commands like real ones: they install bundles (scripts run for real, in
each device's own state dir) and apply configuration. Their device type is `simulated` unless
set, so only bundles built for "*" or for "simulated" install on them, never a bundle meant for
the host's real hardware. A config command's log level applies to the whole process.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from kernex.agent.agent import Agent
from kernex.agent.exceptions import AgentError
from kernex.agent.files import ensure_private_dir
from kernex.agent.http import SharedClient
from kernex.agent.settings import AgentSettings
from kernex.agent.telemetry import Telemetry
from kernex.kit.logs import get_logger

DEVICE_DIR_PREFIX = "device-"
DEFAULT_NAME_PREFIX = "sim"
SIMULATED_DEVICE_TYPE = "simulated"  # matches bundles for "*" (or "simulated"), not the host's machine
# Registration bursts reuse a bounded pool instead of opening a socket per simulated device.
HTTP_MAX_CONNECTIONS = 50
# Every device's state writes are durable (fsync) and go through asyncio.to_thread; the default
# pool (CPU count + 4 threads) made thousands of devices queue behind a few slow fsyncs, so
# their heartbeats came out in bursts (benchmarks/fleet.py). The threads mostly wait on the disk.
FILE_IO_THREADS = 64

log = get_logger(__name__)


def device_dir(base: Path, index: int) -> Path:
    """The state dir of simulated device `index` (1-based): <base>/device-0001, ..."""
    return base / f"{DEVICE_DIR_PREFIX}{index:04d}"


class Simulator:
    """Runs `devices` agents whose state dirs live under `settings.state_dir`.

    Starts are spread evenly over `start_spread_s` (default: one heartbeat interval), so both
    registrations and heartbeats reach the platform as a steady stream rather than in waves.
    """

    def __init__(self, settings: AgentSettings, devices: int, *, start_spread_s: float | None = None) -> None:
        if devices < 1:
            raise ValueError("simulate at least one device")
        self.settings = settings
        self.devices = devices
        self.start_spread_s = settings.heartbeat_interval_s if start_spread_s is None else start_spread_s
        self.agents: list[Agent] = []
        self.failures: list[AgentError] = []

    def device_settings(self, index: int) -> AgentSettings:
        """Settings of simulated device `index`: its own state dir, a numbered name, a harmless type."""
        prefix = self.settings.name or DEFAULT_NAME_PREFIX
        update: dict[str, object] = {
            "state_dir": device_dir(self.settings.state_dir, index),
            "name": f"{prefix}-{index:04d}",
        }
        if "device_type" not in self.settings.model_fields_set:
            update["device_type"] = SIMULATED_DEVICE_TYPE
        return self.settings.model_copy(update=update)

    async def run(self) -> None:
        """Run every device until cancelled; raises the first error if every device stopped on one."""
        base = self.settings.state_dir
        executor = ThreadPoolExecutor(max_workers=FILE_IO_THREADS, thread_name_prefix="simulator-io")
        asyncio.get_running_loop().set_default_executor(executor)
        await asyncio.to_thread(ensure_private_dir, base)
        telemetry = Telemetry(base)
        # No pool timeout: a real device has a connection of its own, so a simulated one waits
        # its turn (kernex.agent.http.SharedClient) instead of failing with PoolTimeout and
        # retrying, which is what a fleet-wide deployment's downloads did (benchmarks/fleet.py).
        timeout = httpx.Timeout(self.settings.api_timeout_s, pool=None)
        async with SharedClient(slots=HTTP_MAX_CONNECTIONS, timeout=timeout) as http:
            self.agents = [
                Agent(self.device_settings(index), http=http, telemetry=telemetry)
                for index in range(1, self.devices + 1)
            ]
            step = self.start_spread_s / self.devices
            log.info(
                "starting simulated devices",
                devices=self.devices,
                base=str(base),
                spread_s=self.start_spread_s,
            )
            async with asyncio.TaskGroup() as tasks:
                for position, agent in enumerate(self.agents):
                    tasks.create_task(self._run_device(agent, delay_s=position * step))
        if self.failures and len(self.failures) == self.devices:
            raise self.failures[0]

    async def _run_device(self, agent: Agent, *, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        try:
            await agent.run()
        except AgentError as exc:
            # One refused device must not stop the others; the last one standing reports it.
            self.failures.append(exc)
            log.error(  # noqa: TRY400 - an expected refusal: its message says it all, no traceback
                "simulated device stopped",
                state_dir=str(agent.settings.state_dir),
                device_id=agent.device_id,
                error=str(exc),
            )
