"""The API's read endpoints over a large fleet: p50/p95/p99 through a real `kernex api` process.

Run: .venv/bin/python -m benchmarks.api [--devices 100000] [--heartbeats 10000000] [--requests 200]

Seeds a fresh PostgreSQL database (migrated to head, so heartbeats are partitioned by day) with
`--devices` devices and `--heartbeats` heartbeat rows spread evenly over the last `--days`
days, in a few set-based INSERT ... SELECT generate_series statements (no per-row round trips),
then ANALYZEs. `kernex api` serves it; each endpoint is requested `--requests` times, one at a
time, with random devices and pages, through HTTP with an operator token. The baseline, in the
same run and process, is GET /healthz: the cost of HTTP, auth-free routing and uvicorn alone.
Target (issue #10): p95 < 100 ms for the device list, device detail, heartbeat history and stats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx

from benchmarks.harness import HOST, Platform, free_port, machine, percentile, wait_http
from kernex.api.auth.schemas import Role
from kernex.api.auth.service import create_user
from kernex.kit import logs
from kernex.storage.database import engine_scope, session_factory
from kernex.storage.partitions import create_partition_sql

PASSWORD = "benchmark-password-not-secret"  # a throwaway account in a throwaway database
TARGET_P95_S = 0.100
SEED_CHUNK_DEVICES = 10_000  # heartbeats are inserted this many devices at a time


async def seed(dsn: str, devices: int, heartbeats: int, days: int, now: datetime) -> float:
    """Fill the database; returns the seconds it took."""
    started = time.perf_counter()
    per_device = max(1, heartbeats // devices)
    step_s = days * 86_400 / per_device
    conn = await asyncpg.connect(dsn)
    try:
        for back in range(1, days + 1):
            await conn.execute(create_partition_sql((now - timedelta(days=back)).date()))
        await conn.execute(
            "INSERT INTO devices (id, name, key_type, public_key_pem, key_fingerprint, state, status, tags, "
            "registered_at, updated_at, command_revision, bundle_version, last_seen_at, last_seq) "
            "SELECT 'dev-' || lpad(g::text, 7, '0'), 'device ' || g, 'ecdsa-p256', 'pem', md5(g::text), "
            "'active', (ARRAY['online','offline','unknown'])[1 + g % 3], '[]', "
            "$1::timestamptz - g * interval '1 second', $1::timestamptz, 0, '1.' || (g % 7), $1, $3 "
            "FROM generate_series(1, $2) g",
            now,
            devices,
            per_device,
        )
        for first in range(1, devices + 1, SEED_CHUNK_DEVICES):
            last = min(devices, first + SEED_CHUNK_DEVICES - 1)
            await conn.execute(
                "INSERT INTO heartbeats (device_id, seq, ts, received_at, status, cpu_percent, memory_mb, "
                "disk_free_mb, uptime_s, bundle_version, config_version, agent_version) "
                "SELECT 'dev-' || lpad(d::text, 7, '0'), s, "
                "$1::timestamptz - (s * $4 + d % 60) * interval '1 second', "
                "$1::timestamptz - (s * $4 + d % 60) * interval '1 second', 'ok', "
                "(s % 100)::float, 512, 2048, s * $4, '1.0', 1, '0.1.0' "
                "FROM generate_series($2::int, $3::int) d, generate_series(1, $5::int) s",
                now,
                first,
                last,
                step_s,
                per_device,
            )
            print(f"  seeded heartbeats of devices {first:,}-{last:,}", flush=True)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return time.perf_counter() - started


def measure(client: httpx.Client, requests: int, path: Callable[[], str]) -> list[float]:
    """Latencies of `requests` sequential GETs (each must answer 200)."""
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(path())
        latencies.append(time.perf_counter() - started)
        if response.status_code != httpx.codes.OK:
            raise SystemExit(
                f"GET {response.request.url} answered {response.status_code}: {response.text[:200]}"
            )
    return latencies


def main() -> None:
    """Seed, serve, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--heartbeats", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=7, help="the heartbeats span this many days")
    parser.add_argument("--requests", type=int, default=200, help="per endpoint")
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks.report)")
    args = parser.parse_args()
    logs.configure("warning", "console")
    print(f"machine: {machine()}")
    now = datetime.now(UTC)
    rng = random.Random(10)
    results: dict[str, object] = {"devices": args.devices, "heartbeats": args.heartbeats}
    with Platform() as platform:
        seeded_s = asyncio.run(seed(platform.dsn, args.devices, args.heartbeats, args.days, now))
        print(f"seeded {args.devices:,} devices and {args.heartbeats:,} heartbeats in {seeded_s:,.0f} s")

        async def add_user() -> None:
            async with engine_scope(platform.database_url) as engine, session_factory(engine)() as session:
                await create_user(session, username="bench", role=Role.OPERATOR, password=PASSWORD)

        asyncio.run(add_user())
        port = free_port()
        api = platform.spawn(
            ["api"], platform.kernex_env(api_port=str(port), mqtt_port="1", rate_limit_per_minute="1000000")
        )
        base = f"http://{HOST}:{port}"
        wait_http(f"{base}/healthz", api, "kernex api")
        token = httpx.post(
            f"{base}/api/v1/auth/login", json={"username": "bench", "password": PASSWORD}, timeout=30
        ).json()["access_token"]

        def device() -> str:
            return f"dev-{rng.randint(1, args.devices):07d}"

        def page() -> str:
            return f"/api/v1/devices?limit=50&offset={rng.randrange(0, 100) * 50}"

        since = (now - timedelta(hours=6)).isoformat().replace("+00:00", "Z")
        endpoints: dict[str, Callable[[], str]] = {
            "GET /healthz (baseline)": lambda: "/healthz",
            "device list page (50, offset < 5,000)": page,
            "device list, status=online": lambda: "/api/v1/devices?status=online&limit=50",
            "device detail": lambda: f"/api/v1/devices/{device()}",
            "heartbeat history (100 newest)": lambda: f"/api/v1/devices/{device()}/heartbeats?limit=100",
            "heartbeat history since 6 h": lambda: f"/api/v1/devices/{device()}/heartbeats?since={since}",
            "fleet stats": lambda: "/api/v1/devices/stats",
        }
        headers = {"Authorization": f"Bearer {token}"}
        print(f"{'endpoint':<40} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  target p95 < 100 ms")
        table = {}
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            for name, path in endpoints.items():
                measure(client, 5, path)  # warm the connection and the caches
                latencies = measure(client, args.requests, path)
                p50, p95, p99 = (percentile(latencies, f) for f in (0.50, 0.95, 0.99))
                table[name] = {"p50_s": p50, "p95_s": p95, "p99_s": p99}
                verdict = "" if "baseline" in name else ("ok" if p95 < TARGET_P95_S else "MISSED")
                print(f"{name:<40} {p50 * 1000:>8.1f} {p95 * 1000:>8.1f} {p99 * 1000:>8.1f}  {verdict}")
        results["endpoints"] = table
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
