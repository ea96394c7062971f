"""A simulated fleet end to end: `kernex simulate` devices, two ingest workers, the API, a deployment.

Run: .venv/bin/python -m benchmarks.fleet [--devices 1000] [--interval 30] [--json out.json]

Starts a fresh Mosquitto (the project's mosquitto.conf), two `kernex ingest` workers, `kernex
api` (admission policy auto) on a fresh PostgreSQL database, then `kernex simulate --devices N`:
real agents with their own keys, registration, mTLS sessions and signed heartbeats, in one
process. It prints:

- how long until every device registered and is online, with the simulator's CPU and RSS;
- steady state over `--steady-seconds`: heartbeats persisted per second beside the rate the
  fleet offers (devices / interval; the baseline: ingest keeping up means the two match), the
  simulator's CPU (cores) and memory per device, and how stale the newest stored heartbeat is;
- a deployment of a small bundle to every device: how long until the retained deploy command
  of every device is on the broker (a subscriber with the API's identity counts them), beside
  how long the same subscriber takes to receive N retained status messages already there
  (the broker's own fan-out rate), and how long until every device reported success.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

from benchmarks.harness import HOST, Platform, cpu_seconds, free_port, machine, wait_http
from benchmarks.ingest import SubscriberSpec, _expect, _start_workers, start_subscriber
from kernex.api.auth.schemas import Role
from kernex.api.auth.service import create_user
from kernex.broker.pki import API_IDENTITY
from kernex.cli.bundle import build_bundle, upload_bundle
from kernex.kit import logs
from kernex.protocol.topics import DEFAULT_PREFIX
from kernex.storage.database import engine_scope, session_factory

PASSWORD = "benchmark-password-not-secret"  # a throwaway account in a throwaway database
BENCH_TAG = "bench-fleet"  # every simulated device gets it: the deployment selects by tag
PROGRESS_S = 5.0
INSTALL_SH = "#!/bin/sh\nexit 0\n"
ACTIVE_STATUSES = {"pending", "in_progress"}  # a deployment in any other status has finished


@dataclass(slots=True)
class Sample:
    """What the database and the simulator process say at one moment."""

    at: float
    registered: int
    online: int
    heartbeats: int
    newest_age_s: float | None


async def _sample(dsn: str) -> Sample:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS registered, count(*) FILTER (WHERE status = 'online') AS online FROM devices"
        )
        heartbeats = await conn.fetchval("SELECT count(*) FROM heartbeats")
        newest = await conn.fetchval("SELECT extract(epoch FROM now() - max(received_at)) FROM heartbeats")
    finally:
        await conn.close()
    assert row is not None  # an aggregate without GROUP BY returns exactly one row
    return Sample(
        time.monotonic(), row["registered"], row["online"], heartbeats, float(newest) if newest else None
    )


def _bundle(platform: Platform, api_url: str, token: str) -> str:
    source = platform.data_dir / "bundle-src"
    source.mkdir()
    manifest = {
        "name": "bench-app",
        "version": "1.0.0",
        "device_types": ["*"],
        "install": {"path": "install.sh", "timeout_s": 60},
    }
    (source / "manifest.json").write_text(json.dumps(manifest))
    (source / "install.sh").write_text(INSTALL_SH)
    (source / "install.sh").chmod(0o755)
    archive, _manifest = build_bundle(source, platform.data_dir / "bench-app-1.0.0.tar.gz")
    stored = upload_bundle(archive, api=api_url, token=token, progress=False)
    bundle_id: str = stored["id"]
    return bundle_id


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--interval", type=int, default=30, help="heartbeat interval (s)")
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=900.0, help="for each phase")
    parser.add_argument("--no-deploy", action="store_true", help="skip the deployment")
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks.report)")
    args = parser.parse_args()
    logs.configure("warning", "console")
    print(f"machine: {machine()}")
    results: dict[str, Any] = {"devices": args.devices, "interval_s": args.interval}
    with Platform() as platform:
        broker = platform.start_broker()
        _start_workers(platform, broker, 2)
        api_port = free_port()
        api_url = f"http://{HOST}:{api_port}"
        api_env = platform.kernex_env(
            broker,
            api_port=str(api_port),
            mqtt_public_host=HOST,
            mqtt_public_port=str(broker.port),
            admission_policy="auto",
            rate_limit_per_minute="1000000",
            device_rate_limit_per_address_per_minute="1000000",
        )
        api = platform.spawn(["api"], api_env)
        wait_http(f"{api_url}/readyz", api, "kernex api")

        async def add_user() -> None:
            async with engine_scope(platform.database_url) as engine, session_factory(engine)() as session:
                await create_user(session, username="bench", role=Role.ADMIN, password=PASSWORD)

        asyncio.run(add_user())
        token = httpx.post(
            f"{api_url}/api/v1/auth/login", json={"username": "bench", "password": PASSWORD}, timeout=30
        ).json()["access_token"]

        state_dir = platform.data_dir / "simulated"
        sim_env = platform.kernex_env(agent_log_level="WARNING")
        started = time.monotonic()
        simulator = platform.spawn(
            [
                "simulate",
                "--devices",
                str(args.devices),
                "--api",
                api_url,
                "--interval",
                str(args.interval),
                "--state-dir",
                str(state_dir),
            ],
            sim_env,
        )
        sim = psutil.Process(simulator.pid)
        print(
            f"{'t (s)':>6} {'registered':>10} {'online':>7} {'heartbeats':>10} {'sim CPU':>8} {'sim RSS':>9}"
        )
        last_cpu, last_at = cpu_seconds([simulator.pid]), time.monotonic()
        online_at = None
        while time.monotonic() - started < args.timeout:
            time.sleep(PROGRESS_S)
            if simulator.poll() is not None:
                raise SystemExit(f"kernex simulate exited with {simulator.returncode}")
            sample = asyncio.run(_sample(platform.dsn))
            cpu, now = cpu_seconds([simulator.pid]), time.monotonic()
            rss = sim.memory_info().rss / 1024**2
            print(
                f"{now - started:>6.0f} {sample.registered:>10,} {sample.online:>7,} {sample.heartbeats:>10,}"
                f" {(cpu - last_cpu) / (now - last_at):>7.2f}c {rss:>7,.0f}MB"
            )
            last_cpu, last_at = cpu, now
            if sample.online >= args.devices:
                online_at = now
                break
        if online_at is None:
            raise SystemExit(f"not every device came online within {args.timeout} s")
        results["all_online_s"] = online_at - started
        print(f"all {args.devices:,} devices registered and online after {online_at - started:,.0f} s")

        # Steady state: heartbeats persisted against the rate the fleet offers.
        first = asyncio.run(_sample(platform.dsn))
        cpu0 = cpu_seconds([simulator.pid])
        time.sleep(args.steady_seconds)
        last = asyncio.run(_sample(platform.dsn))
        cpu1 = cpu_seconds([simulator.pid])
        persisted = (last.heartbeats - first.heartbeats) / (last.at - first.at)
        offered = args.devices / args.interval
        cores = (cpu1 - cpu0) / (last.at - first.at)
        rss_mb = sim.memory_info().rss / 1024**2
        results.update(
            persisted_per_s=persisted,
            offered_per_s=offered,
            simulator_cores=cores,
            simulator_rss_mb=rss_mb,
            rss_kb_per_device=rss_mb * 1024 / args.devices,
            newest_heartbeat_age_s=last.newest_age_s,
            online=last.online,
        )
        print(
            f"steady state over {args.steady_seconds:.0f} s: {persisted:,.1f} heartbeats/s persisted vs "
            f"{offered:,.1f}/s offered ({persisted / offered:.2f}); simulator {cores:.2f} cores, "
            f"{rss_mb:,.0f} MB RSS ({rss_mb * 1024 / args.devices:,.0f} KB/device); newest stored heartbeat "
            f"{last.newest_age_s or 0:.1f} s old; online {last.online:,}"
        )
        # Written before the deployment too: its figures survive a deployment that never ends.
        _save(args.json, results)
        if not args.no_deploy:
            results.update(_deploy(platform, broker.port, api_url, token, args))
            _save(args.json, results)


def _save(path: Path | None, results: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps({"machine": machine(), "results": results}, indent=2) + "\n")


def _deploy(
    platform: Platform, port: int, api_url: str, token: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Deploy to every device; (commands on the broker, all succeeded) times."""
    asyncio.run(_tag_all(platform.dsn))
    bundle_id = _bundle(platform, api_url, token)
    devices_topic = f"{DEFAULT_PREFIX}/devices/+"
    spec = {
        "port": port,
        "ca_path": str(platform.pki.ca_cert_path),
        "cert_path": str(platform.pki.service_cert_path(API_IDENTITY)),
        "key_path": str(platform.pki.service_key_path(API_IDENTITY)),
        "expected": args.devices,
        "record_ids": False,
        "timeout_s": args.timeout,
    }
    # Baseline: the same subscriber receiving N retained messages the broker already holds
    # (every device's status), first to last: the broker's own fan-out of retained messages.
    pipe, proc = start_subscriber(SubscriberSpec(topic=f"{devices_topic}/status", **spec))
    received, first_at, last_at, _cpu, _ = _expect(pipe, "done", args.timeout)
    proc.join(timeout=10)
    retained_s = last_at - first_at
    pipe, proc = start_subscriber(SubscriberSpec(topic=f"{devices_topic}/commands/deploy", **spec))
    headers = {"Authorization": f"Bearer {token}"}
    created_at = time.monotonic()
    response = httpx.post(
        f"{api_url}/api/v1/deployments",
        # The targets' own timeout is the benchmark's: they must not fail before it gives up.
        json={"bundle_id": bundle_id, "tags": [BENCH_TAG], "timeout_s": math.ceil(args.timeout)},
        headers=headers,
        timeout=args.timeout,
    )
    if response.status_code != httpx.codes.CREATED:
        raise SystemExit(f"deployment refused: {response.status_code} {response.text}")
    answered_s = time.monotonic() - created_at
    deployment_id = response.json()["id"]
    commands, _first, commands_at, _cpu, _ = _expect(pipe, "done", args.timeout)
    proc.join(timeout=10)
    commands_s = commands_at - created_at
    counts: dict[str, int] = {}
    succeeded_s = None
    while time.monotonic() - created_at < args.timeout:
        body = httpx.get(f"{api_url}/api/v1/deployments/{deployment_id}", headers=headers, timeout=30).json()
        counts = body["counts"]
        if body["status"] not in ACTIVE_STATUSES:
            succeeded_s = time.monotonic() - created_at
            break
        time.sleep(1.0)
    elapsed_s = time.monotonic() - created_at
    succeeded_rate = counts.get("succeeded", 0) / elapsed_s
    print(
        f"deployment to {args.devices:,} devices: POST answered in {answered_s:.1f} s; {commands:,} retained "
        f"commands on the broker after {commands_s:.1f} s (baseline: {received:,} retained statuses "
        f"received in {retained_s:.1f} s); all done after "
        + (f"{succeeded_s:.1f} s" if succeeded_s is not None else "(timed out)")
        + f": {counts} ({succeeded_rate:.1f} devices succeeded per second)"
    )
    return {
        "deploy_post_s": answered_s,
        "deploy_commands_s": commands_s,
        "deploy_commands": commands,
        "retained_baseline_s": retained_s,
        "deploy_done_s": succeeded_s,
        "deploy_counts": counts,
        "deploy_succeeded_per_s": succeeded_rate,
    }


async def _tag_all(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE devices SET tags = $1::jsonb", json.dumps([BENCH_TAG]))
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
