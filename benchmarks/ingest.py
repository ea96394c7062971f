"""Signed heartbeats persisted per second through Mosquitto and `kernex ingest` into PostgreSQL.

Run: .venv/bin/python -m benchmarks.ingest [--devices 1000] [--per-device 30] [--json out.json]

Every measurement starts a fresh Mosquitto (the project's mosquitto.conf, a free port) and
publishes the same workload: `--devices` devices, each on its own mutual-TLS connection, send
`--per-device` ECDSA-signed QoS 1 heartbeats, signed before the clock starts, from
`--publishers` processes (benchmarks.mqttload). Printed side by side:

- raw: a plain paho subscriber (QoS 1, acknowledging at once, no other work) on the same
  broker: the ceiling the broker and the publishers allow;
- `kernex ingest` with 1 and with 2 worker processes on the shared subscription: rate from
  the first publish until the last row is committed (the heartbeats table is polled);
- naive: verify each message, INSERT it and commit, acknowledge, next (asyncpg, autocommit);
- publish→commit latency p50/p99 at a fixed offered rate (`--latency-rate`, 5,000/s by
  default) with 2 workers, measured from each message's publish to its republication on the
  fleet topics, which ingest sends right after the batch commits (kernex.ingest.fleet).

CPU is reported per 1,000 messages: the consumer processes', the broker's, and the local
PostgreSQL server's (all its processes: the server is shared with whatever else runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import ssl
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.harness import (
    HOST,
    Broker,
    Platform,
    cpu_by_pid,
    cpu_seconds,
    cpu_used,
    free_port,
    machine,
    percentile,
    postgres_pids,
    wait_http,
)
from benchmarks.mqttload import DeviceSpec, LoadResult, LoadSpec, publish_process
from kernex.broker.pki import INGEST_IDENTITY
from kernex.ingest.keys import DeviceKey
from kernex.ingest.verifier import RawMessage, VerifiedHeartbeat, Verifier, VerifyLimits
from kernex.kit import logs
from kernex.protocol.keys import load_public_key_pem
from kernex.protocol.topics import DEFAULT_PREFIX, Channel, Topics
from kernex.storage.models import AdmissionState
from kernex.storage.writer import HEARTBEAT_COLUMNS

SPAWN = multiprocessing.get_context("spawn")  # no inherited event loops, threads or sockets
POLL_S = 0.1  # how often the heartbeats table is counted while a run drains
READY_TIMEOUT_S = 120.0  # signing and connecting a publisher's share of the fleet
SUBSCRIBER_READY_S = 30.0
IDLE_END_S = 10.0  # a subscriber that heard nothing for this long stops waiting
TARGETS = {"persisted_per_s": 8000, "of_raw": 0.60, "over_naive": 10.0, "p99_s": 1.0}


@dataclass(slots=True)
class Run:
    """One measurement."""

    name: str
    messages: int
    seconds: float
    rate: float
    consumer_cpu_s: float
    broker_cpu_s: float
    postgres_cpu_s: float
    lost: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def per_1k_ms(self, cpu_s: float) -> float:
        """CPU milliseconds per 1,000 messages."""
        return cpu_s * 1e6 / max(self.messages, 1)


# --- publishers ------------------------------------------------------------------------------


class Publishers:
    """Publisher processes, each with a slice of the devices; signed and connected before start()."""

    def __init__(
        self,
        broker: Broker,
        platform: Platform,
        devices: list[DeviceSpec],
        *,
        per_device: int,
        processes: int,
        rate: float | None,
    ) -> None:
        self._pipes: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        slices = [devices[i::processes] for i in range(processes)]
        for part in slices:
            spec = LoadSpec(
                host=HOST,
                port=broker.port,
                ca_path=str(platform.pki.ca_cert_path),
                topic_prefix=DEFAULT_PREFIX,
                devices=part,
                first_seq=1,
                per_device=per_device,
                rate=rate * len(part) / len(devices) if rate else None,
            )
            parent, child = SPAWN.Pipe()
            proc = SPAWN.Process(target=publish_process, args=(spec, child), daemon=True)
            proc.start()
            child.close()  # the child's copy is its own: a child that dies then reads as EOF here
            self._pipes.append(parent)
            self._procs.append(proc)
        for pipe in self._pipes:
            _expect(pipe, "ready", READY_TIMEOUT_S)

    def start(self) -> float:
        """Start every publisher at the same moment (a little ahead); returns that moment."""
        start_at = time.monotonic() + 0.2
        for pipe in self._pipes:
            pipe.send(start_at)
        return start_at

    def results(self, timeout: float) -> list[LoadResult]:
        """Wait for every publisher's report."""
        out = [_expect(pipe, "done", timeout) for pipe in self._pipes]
        for proc in self._procs:
            proc.join(timeout=10)
        return out


def _expect(pipe: Connection, what: str, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise SystemExit(f"a benchmark process did not report {what!r} within {timeout} s")
    try:
        kind, value = pipe.recv()
    except EOFError:
        raise SystemExit(f"a benchmark process exited before reporting {what!r}") from None
    if kind == "error":
        raise SystemExit(f"a benchmark process failed: {value}")
    if kind != what:
        raise SystemExit(f"a benchmark process reported {kind!r}, expected {what!r}")
    return value


# --- subscribers (raw baseline, latency probe) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscriberSpec:
    """A plain paho subscriber in its own process."""

    port: int
    ca_path: str
    cert_path: str
    key_path: str
    topic: str
    expected: int
    record_ids: bool  # fleet messages: note when each (device_id, seq) arrived
    timeout_s: float


def subscriber_process(spec: SubscriberSpec, pipe: Connection) -> None:
    """Count (and optionally time) messages until `expected` arrived or the timeout passed."""
    done = threading.Event()
    subscribed = threading.Event()
    arrivals: dict[tuple[str, int], float] = {}
    times: list[float] = []

    def on_subscribe(*_args: object) -> None:
        subscribed.set()

    def on_message(_client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        times.append(now)
        if spec.record_ids:
            body = json.loads(message.payload)
            if body.get("type") == "heartbeat":
                arrivals.setdefault((body["device_id"], body["seq"]), now)
        if len(times) >= spec.expected:
            done.set()

    client_id = f"bench-sub-{uuid.uuid4().hex[:8]}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=spec.ca_path)
    context.load_cert_chain(spec.cert_path, spec.key_path)
    client.tls_set_context(context)
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(HOST, spec.port, keepalive=60)
    client.loop_start()
    client.subscribe(spec.topic, qos=1)
    if not subscribed.wait(SUBSCRIBER_READY_S):
        pipe.send(("error", "no SUBACK"))
        return
    started_cpu = time.process_time()
    pipe.send(("ready", None))
    deadline = time.monotonic() + spec.timeout_s
    while not done.wait(1.0) and time.monotonic() < deadline:
        if times and time.monotonic() - times[-1] > IDLE_END_S:
            break  # some never came (e.g. fleet messages dropped): report what did
    cpu = time.process_time() - started_cpu
    client.disconnect()
    client.loop_stop()
    pipe.send(("done", (len(times), times[0] if times else 0.0, times[-1] if times else 0.0, cpu, arrivals)))


def start_subscriber(spec: SubscriberSpec) -> tuple[Connection, multiprocessing.process.BaseProcess]:
    """A subscriber process, subscribed when this returns."""
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=subscriber_process, args=(spec, child), daemon=True)
    proc.start()
    child.close()
    _expect(parent, "ready", SUBSCRIBER_READY_S)
    return parent, proc


# --- the naive consumer ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NaiveSpec:
    """Where the naive consumer reads from and writes to."""

    port: int
    ca_path: str
    cert_path: str
    key_path: str
    dsn: str
    expected: int
    timeout_s: float


def naive_process(spec: NaiveSpec, pipe: Connection) -> None:
    """Verify, INSERT and commit one message at a time, acknowledging each after its commit."""
    asyncio.run(_naive(spec, pipe))


async def _naive(spec: NaiveSpec, pipe: Connection) -> None:
    db = await asyncpg.connect(spec.dsn)
    keys = {
        row["id"]: DeviceKey(row["id"], AdmissionState.ACTIVE, load_public_key_pem(row["public_key_pem"]))
        for row in await db.fetch("SELECT id, public_key_pem FROM devices")
    }
    topics = Topics(DEFAULT_PREFIX)
    verifier = Verifier(topics, VerifyLimits(65_536, timedelta(minutes=5), timedelta(days=1)))
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[mqtt.MQTTMessage] = asyncio.Queue()
    subscribed = asyncio.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-naive", protocol=mqtt.MQTTv5)
    client.manual_ack_set(on=True)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=spec.ca_path)
    context.load_cert_chain(spec.cert_path, spec.key_path)
    client.tls_set_context(context)

    def on_subscribe(*_args: object) -> None:
        loop.call_soon_threadsafe(subscribed.set)

    def on_message(_client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, message)

    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(HOST, spec.port, keepalive=60)
    client.loop_start()
    client.subscribe(topics.all_devices(Channel.HEARTBEAT), qos=1)
    await asyncio.wait_for(subscribed.wait(), SUBSCRIBER_READY_S)
    columns = ", ".join(HEARTBEAT_COLUMNS)
    binds = ", ".join(f"${i}" for i in range(1, len(HEARTBEAT_COLUMNS) + 1))
    # No conflict target: on PostgreSQL heartbeats is partitioned and its key includes ts.
    insert = f"INSERT INTO heartbeats ({columns}) VALUES ({binds}) ON CONFLICT DO NOTHING"
    started_cpu = time.process_time()
    pipe.send(("ready", None))
    handled = 0
    first = last = 0.0
    deadline = time.monotonic() + spec.timeout_s
    while handled < spec.expected and time.monotonic() < deadline:
        try:
            message = await asyncio.wait_for(queue.get(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        if not first:
            first = time.monotonic()
        raw = RawMessage(message.topic, bytes(message.payload), datetime.now(UTC))
        verdict = verifier.verify(raw, keys.get)
        if isinstance(verdict, VerifiedHeartbeat):
            c = verdict.claims
            # One statement outside a transaction block: asyncpg commits it on its own.
            await db.execute(
                insert,
                verdict.device_id,
                c.seq,
                c.ts,
                verdict.received_at,
                c.status,
                c.metrics.cpu_percent,
                c.metrics.memory_mb,
                c.metrics.disk_free_mb,
                c.metrics.uptime_s,
                c.bundle.id if c.bundle else None,
                c.bundle.version if c.bundle else None,
                c.config_version,
                c.agent_version,
            )
        client.ack(message.mid, message.qos)
        handled += 1
        last = time.monotonic()
    cpu = time.process_time() - started_cpu
    client.disconnect()
    client.loop_stop()
    await db.close()
    pipe.send(("done", (handled, first, last, cpu)))


# --- measurements ------------------------------------------------------------------------------


def _wait_rows(platform: Platform, expected: int, timeout_s: float) -> tuple[int, float]:
    """Poll the heartbeats table until it holds `expected` rows; (rows, when) of the last change."""
    deadline = time.monotonic() + timeout_s
    rows, changed_at = 0, time.monotonic()

    async def poll() -> tuple[int, float]:
        nonlocal rows, changed_at
        conn = await asyncpg.connect(platform.dsn)
        try:
            while time.monotonic() < deadline:
                count = await conn.fetchval("SELECT count(*) FROM heartbeats")
                if count != rows:
                    rows, changed_at = count, time.monotonic()
                if rows >= expected:
                    break
                await asyncio.sleep(POLL_S)
        finally:
            await conn.close()
        return rows, changed_at

    return asyncio.run(poll())


def measure_raw(platform: Platform, devices: list[DeviceSpec], args: argparse.Namespace) -> Run:
    """A plain QoS 1 subscriber that only counts."""
    broker = platform.start_broker()
    expected = len(devices) * args.per_device
    try:
        pipe, proc = start_subscriber(
            SubscriberSpec(
                port=broker.port,
                ca_path=str(platform.pki.ca_cert_path),
                cert_path=str(platform.pki.service_cert_path(INGEST_IDENTITY)),
                key_path=str(platform.pki.service_key_path(INGEST_IDENTITY)),
                topic=Topics(DEFAULT_PREFIX).all_devices(Channel.HEARTBEAT),
                expected=expected,
                record_ids=False,
                timeout_s=args.timeout,
            )
        )
        publishers = Publishers(
            broker, platform, devices, per_device=args.per_device, processes=args.publishers, rate=None
        )
        broker_cpu = cpu_seconds([broker.process.pid])
        start_at = publishers.start()
        publishers.results(args.timeout)
        received, _first, last, cpu, _ = _expect(pipe, "done", args.timeout)
        proc.join(timeout=10)
        broker_cpu = cpu_seconds([broker.process.pid]) - broker_cpu
    finally:
        platform.stop_broker(broker)
    seconds = last - start_at
    return Run(
        "raw subscriber (QoS 1, no work)",
        received,
        seconds,
        received / seconds,
        cpu,
        broker_cpu,
        0.0,
        lost=expected - received,
    )


def _start_workers(platform: Platform, broker: Broker, workers: int, **settings: str) -> list[Any]:
    children = []
    for index in range(1, workers + 1):
        metrics_port = free_port()
        env = platform.kernex_env(
            broker, client_id=f"bench-ingest-{index}", metrics_port=str(metrics_port), **settings
        )
        child = platform.spawn(["ingest"], env)
        wait_http(
            f"http://{HOST}:{metrics_port}/metrics",
            child,
            "kernex ingest",
            contains="kernex_ingest_broker_connected 1.0",
        )
        children.append(child)
    return children


def measure_ingest(
    platform: Platform, devices: list[DeviceSpec], args: argparse.Namespace, workers: int
) -> Run:
    """`workers` kernex ingest processes, publishers at full speed, until every row is committed."""
    asyncio.run(platform.reset_heartbeats())
    broker = platform.start_broker()
    expected = len(devices) * args.per_device
    try:
        children = _start_workers(platform, broker, workers)
        publishers = Publishers(
            broker, platform, devices, per_device=args.per_device, processes=args.publishers, rate=None
        )
        pids = [c.pid for c in children]
        before = (cpu_seconds(pids), cpu_seconds([broker.process.pid]), cpu_by_pid(postgres_pids()))
        start_at = publishers.start()
        rows, done_at = _wait_rows(platform, expected, args.timeout)
        after = (cpu_seconds(pids), cpu_seconds([broker.process.pid]), cpu_by_pid(postgres_pids()))
        publishers.results(args.timeout)
        for child in children:
            platform.stop(child)
    finally:
        platform.stop_broker(broker)
    seconds = done_at - start_at
    name = f"kernex ingest, {workers} worker{'s' if workers > 1 else ''}"
    return Run(
        name,
        rows,
        seconds,
        rows / seconds,
        after[0] - before[0],
        after[1] - before[1],
        cpu_used(before[2], after[2]),
        lost=expected - rows,
    )


def measure_naive(platform: Platform, devices: list[DeviceSpec], args: argparse.Namespace) -> Run:
    """Verify + one INSERT and commit per message: fewer messages, it is slow."""
    asyncio.run(platform.reset_heartbeats())
    broker = platform.start_broker()
    expected = len(devices) * args.naive_per_device
    try:
        parent, child = SPAWN.Pipe()
        spec = NaiveSpec(
            port=broker.port,
            ca_path=str(platform.pki.ca_cert_path),
            cert_path=str(platform.pki.service_cert_path(INGEST_IDENTITY)),
            key_path=str(platform.pki.service_key_path(INGEST_IDENTITY)),
            dsn=platform.dsn,
            expected=expected,
            timeout_s=args.timeout,
        )
        proc = SPAWN.Process(target=naive_process, args=(spec, child), daemon=True)
        proc.start()
        child.close()
        _expect(parent, "ready", SUBSCRIBER_READY_S)
        publishers = Publishers(
            broker, platform, devices, per_device=args.naive_per_device, processes=args.publishers, rate=None
        )
        before = (cpu_seconds([broker.process.pid]), cpu_by_pid(postgres_pids()))
        start_at = publishers.start()
        handled, _first, last, cpu = _expect(parent, "done", args.timeout + 10)
        after = (cpu_seconds([broker.process.pid]), cpu_by_pid(postgres_pids()))
        publishers.results(args.timeout)
        proc.join(timeout=10)
    finally:
        platform.stop_broker(broker)
    seconds = last - start_at
    return Run(
        "naive: verify + INSERT/commit each",
        handled,
        seconds,
        handled / seconds,
        cpu,
        after[0] - before[0],
        cpu_used(before[1], after[1]),
        lost=expected - handled,
    )


def measure_latency(
    platform: Platform, devices: list[DeviceSpec], args: argparse.Namespace, rate: float
) -> Run:
    """Offered `rate` msgs/s for `--latency-seconds`, 2 workers; publish → fleet republication."""
    asyncio.run(platform.reset_heartbeats())
    broker = platform.start_broker()
    per_device = max(1, math.ceil(rate * args.latency_seconds / len(devices)))
    expected = per_device * len(devices)
    try:
        children = _start_workers(platform, broker, 2)
        pipe, proc = start_subscriber(
            SubscriberSpec(
                port=broker.port,
                ca_path=str(platform.pki.ca_cert_path),
                cert_path=str(platform.integrator_cert),
                key_path=str(platform.integrator_key),
                topic=f"{DEFAULT_PREFIX}/fleet/devices/+/heartbeat",
                expected=expected,
                record_ids=True,
                timeout_s=args.timeout,
            )
        )
        publishers = Publishers(
            broker, platform, devices, per_device=per_device, processes=args.publishers, rate=rate
        )
        pids = [c.pid for c in children]
        before = (cpu_seconds(pids), cpu_seconds([broker.process.pid]), cpu_by_pid(postgres_pids()))
        start_at = publishers.start()
        loads = publishers.results(args.timeout)
        _count, _first, _last, _cpu, arrivals = _expect(pipe, "done", args.timeout)
        after = (cpu_seconds(pids), cpu_seconds([broker.process.pid]), cpu_by_pid(postgres_pids()))
        proc.join(timeout=10)
        for child in children:
            platform.stop(child)
    finally:
        platform.stop_broker(broker)
    published: dict[tuple[str, int], float] = {}
    for load in loads:
        published.update(load.published)
    latencies = [arrivals[k] - t for k, t in published.items() if k in arrivals]
    publish_s = max(x.last_at for x in loads) - start_at
    return Run(
        f"latency at {rate:,.0f}/s offered, 2 workers",
        len(latencies),
        publish_s,
        expected / publish_s,
        after[0] - before[0],
        after[1] - before[1],
        cpu_used(before[2], after[2]),
        lost=expected - len(latencies),
        extra={
            "p50_s": percentile(latencies, 0.50),
            "p99_s": percentile(latencies, 0.99),
            "max_s": max(latencies, default=float("nan")),
            "offered_per_s": rate,
        },
    )


# --- report --------------------------------------------------------------------------------------


def _row(run: Run, raw: Run) -> str:
    return (
        f"{run.name:<40} {run.messages:>8,} {run.rate:>10,.0f} {run.rate / raw.rate:>7.2f}"
        f" {run.per_1k_ms(run.consumer_cpu_s):>9,.0f} {run.per_1k_ms(run.broker_cpu_s):>8,.0f}"
        f" {run.per_1k_ms(run.postgres_cpu_s):>9,.0f}" + (f"  ({run.lost:,} missing)" if run.lost else "")
    )


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000, help="devices, one mTLS connection each")
    parser.add_argument("--per-device", type=int, default=30, help="heartbeats per device per run")
    parser.add_argument("--naive-per-device", type=int, default=3, help="heartbeats per device, naive run")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument("--latency-rate", type=float, default=5000.0, help="offered msgs/s for latency")
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="length of the latency run")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on a run after this long")
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks.report)")
    args = parser.parse_args()

    logs.configure("warning", "console")  # broker start-up lines would interleave with the table
    print(f"machine: {machine()}")
    with Platform() as platform:
        started = time.perf_counter()
        devices = platform.create_devices(args.devices)
        print(
            f"workload: {args.devices:,} devices (ECDSA P-256, one mTLS connection each), "
            f"{args.per_device} signed heartbeats each, {args.publishers} publisher processes "
            f"(setup {time.perf_counter() - started:.1f} s)"
        )
        raw = measure_raw(platform, devices, args)
        one = measure_ingest(platform, devices, args, 1)
        two = measure_ingest(platform, devices, args, 2)
        naive = measure_naive(platform, devices, args)
        latency = measure_latency(platform, devices, args, args.latency_rate)
        runs = [raw, one, two, naive]
        sustainable = 0.8 * two.rate
        if sustainable < args.latency_rate:
            runs_latency = [latency, measure_latency(platform, devices, args, round(sustainable, -2))]
        else:
            runs_latency = [latency]
    print(
        f"{'measurement':<40} {'messages':>8} {'msgs/s':>10} {'vs raw':>7}"
        f" {'CPU ms/1k':>9} {'broker':>8} {'postgres':>9}"
    )
    for run in runs:
        print(_row(run, raw))
    print(
        f"ratios: 2 workers / raw {two.rate / raw.rate:.2f} (target >= {TARGETS['of_raw']:.2f}); "
        f"2 workers / naive {two.rate / naive.rate:.1f}x (target >= {TARGETS['over_naive']:.0f}x); "
        f"2 workers / 1 worker {two.rate / one.rate:.2f}; "
        f"2 workers {two.rate:,.0f}/s (target >= {TARGETS['persisted_per_s']:,}/s)"
    )
    for run in runs_latency:
        print(
            f"{run.name}: published at {run.rate:,.0f}/s, "
            f"publish→commit p50 {run.extra['p50_s'] * 1000:,.0f} ms, "
            f"p99 {run.extra['p99_s'] * 1000:,.0f} ms, max {run.extra['max_s'] * 1000:,.0f} ms "
            f"over {run.messages:,} messages"
            + (f" ({run.lost:,} not seen)" if run.lost else "")
            + f"; ingest CPU {run.per_1k_ms(run.consumer_cpu_s):,.0f} ms/1k"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "runs": [asdict(r) for r in runs],
                    "latency": [asdict(r) for r in runs_latency],
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
