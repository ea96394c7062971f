"""PostgreSQL goes away under a running platform (`kernex up`), then comes back.

The shared test server cannot be stopped, so the platform reaches it through a TCP proxy that
the test cuts (new connections refused, open ones reset) and restores. While it is cut:
ingest stops acknowledging, backs off (a bounded number of attempts, little CPU), and stays up;
/readyz says the database is down; the API answers 503 with a clear message, never 500.
After it is restored every heartbeat is stored exactly once.

KERNEX_TEST_PG_OUTAGE_S sets how long the outage lasts (default 10 s; the issue's 30 s behaves
the same, with more backoff doublings capped at the ingest's RETRY_MAX_S).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from kernex.broker.pki import FleetPKI
from kernex.broker.settings import BrokerSettings
from kernex.ingest.worker import RETRY_INITIAL_S
from kernex.protocol.topics import Topics
from tests.fixtures.faults import HeartbeatPublisher, TcpProxy, stored_count, stored_seqs
from tests.fixtures.platform import Platform, run_platform, wait_for
from tests.test_e2e_hostile import PlatformBroker, register

OUTAGE_S = float(os.environ.get("KERNEX_TEST_PG_OUTAGE_S", "10"))
DEVICES = 2
RATE_PER_DEVICE = 20.0
SETTLE_S = 120
# Ingest's write retries double from RETRY_INITIAL_S with full jitter: over the outage a worker
# that backs off makes a handful of attempts per stage; one that spins makes thousands.
MAX_ATTEMPTS = 40
# CPU seconds ingest may burn per second of outage while it waits (it still reads MQTT).
MAX_CPU_FRACTION = 0.5


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TcpProxy]:
    target = urlsplit(pg_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    relay = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    relay.start()
    yield relay
    relay.close()


@pytest.fixture
async def platform(pg_url: str, proxy: TcpProxy, tmp_path: Path) -> AsyncIterator[Platform]:
    via_proxy = pg_url.replace(f":{urlsplit(pg_url).port}/", f":{proxy.port}/", 1)
    async with run_platform(tmp_path, via_proxy) as running:
        yield running


def ingest_process(platform: Platform) -> psutil.Process:
    children = psutil.Process(platform.proc.pid).children()
    found = [c for c in children if "ingest" in c.cmdline()]
    assert len(found) == 1, [c.cmdline() for c in children]
    return found[0]


async def test_database_outage_ingest_backs_off_api_answers_503_and_nothing_is_lost(
    platform: Platform, proxy: TcpProxy, pg_url: str, tmp_path: Path
) -> None:
    pki = FleetPKI.from_settings(BrokerSettings(data_dir=platform.data_dir))
    endpoint = PlatformBroker("127.0.0.1", platform.mqtt_port, pki)
    publishers = []
    for i in range(DEVICES):
        device = await register(platform, tmp_path / f"device-{i}")
        publishers.append(
            HeartbeatPublisher(
                endpoint,
                Topics(),
                device.device_id,
                device.key,
                device.cert_path,
                device.key_path,
                rate_per_s=RATE_PER_DEVICE,
            )
        )
    per_device = int(RATE_PER_DEVICE * (OUTAGE_S + 10))
    ingest = ingest_process(platform)
    try:
        for p in publishers:
            p.start(1, per_device)

        async def flowing() -> bool:
            return await stored_count(pg_url) >= 20

        await wait_for(flowing, SETTLE_S, "heartbeats flowing", log=platform)
        errors_before = await platform.ingest_metric("kernex_ingest_db_errors_total")
        cpu_before = sum(ingest.cpu_times()[:2])
        proxy.cut()
        cut_at = time.monotonic()

        async def not_ready() -> dict[str, object] | None:
            response = await platform.get("/readyz")
            return response.json() if response.status_code == 503 else None

        readiness = await wait_for(not_ready, 30, "/readyz to report the outage", log=platform)
        assert readiness["checks"]["database"] != "ok"  # type: ignore[index]
        assert readiness["checks"]["broker"] == "ok"  # type: ignore[index]
        device_path = f"/api/v1/devices/{publishers[0].device_id}"
        for path in ("/api/v1/devices", device_path, "/api/v1/devices/stats"):
            response = await platform.get(path)
            assert response.status_code == 503, (path, response.status_code, response.text)
            error = response.json()["error"]
            assert error["code"] == "database_unavailable", error
            assert "database" in error["message"]
        async with httpx.AsyncClient(timeout=10) as client:
            login = await client.post(
                platform.api_url + "/api/v1/auth/login", json={"username": "nobody", "password": "x" * 20}
            )
        assert login.status_code == 503, login.text

        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))
        held = await platform.ingest_metric("kernex_ingest_pending_acks")
        attempts = await platform.ingest_metric("kernex_ingest_db_errors_total") - errors_before
        cpu = sum(ingest.cpu_times()[:2]) - cpu_before
        outage = time.monotonic() - cut_at
        assert ingest.is_running(), "ingest must ride out a database outage"
        assert held > 0, "messages received during the outage stay unacknowledged"
        assert 1 <= attempts <= MAX_ATTEMPTS, f"{attempts} failed writes in {outage:.0f} s"
        assert cpu < MAX_CPU_FRACTION * outage, f"ingest used {cpu:.1f} CPU s in a {outage:.0f} s outage"
        print(
            f"outage {outage:.1f} s: {attempts:.0f} failed writes (first retry after {RETRY_INITIAL_S} s), "
            f"{held:.0f} messages held unacknowledged, ingest CPU {cpu:.2f} s"
        )
        proxy.restore()

        async def ready() -> bool:
            return (await platform.get("/readyz")).status_code == 200

        await wait_for(ready, SETTLE_S, "/readyz to recover", log=platform)
        for p in publishers:
            await asyncio.to_thread(p.join)
        total = DEVICES * per_device

        async def caught_up() -> bool:
            return await stored_count(pg_url) >= total

        await wait_for(caught_up, SETTLE_S, f"all {total} heartbeats stored", log=platform)
    finally:
        for p in publishers:
            await asyncio.to_thread(p.close)
    for p in publishers:
        assert await stored_seqs(pg_url, p.device_id) == p.published
    assert (await platform.get("/api/v1/devices")).status_code == 200
    assert ingest.is_running()
    assert platform.proc.poll() is None, "every platform process rode out the outage"
    # A dependency outage is a warning per request, never an error line or a traceback.
    assert "Traceback" not in platform.log()
    assert '"level": "error"' not in platform.log()
    assert '"request failed: dependency unavailable"' in platform.log()
