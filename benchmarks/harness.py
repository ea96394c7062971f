"""What the end-to-end benchmarks share: a fleet PKI, brokers, a Postgres database, devices.

Everything is real and started the way the tests start it: Mosquitto rendered from the
project's mosquitto.conf on a free port, a fresh database on the local PostgreSQL server
(KERNEX_BENCH_POSTGRES_URL, default the tests' postgresql://postgres@127.0.0.1:5432/postgres)
migrated to head, and `kernex ingest` / `kernex api` as subprocesses configured through their
KERNEX_ settings. Nothing here uses the Mosquitto on port 1883.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import asyncpg
import httpx
import psutil

from benchmarks.mqttload import DeviceSpec
from kernex.broker.config import render
from kernex.broker.integrators import IntegratorRegistry
from kernex.broker.pki import FleetPKI
from kernex.broker.process import MosquittoProcess
from kernex.broker.settings import BrokerSettings
from kernex.protocol.keys import (
    KeyType,
    device_id_for,
    generate_private_key,
    key_type_of,
    private_key_to_pem,
    public_key_fingerprint,
    public_key_to_pem,
)
from kernex.protocol.topics import DEFAULT_PREFIX
from kernex.storage.migrate import upgrade

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
BENCH_INTEGRATOR = "bench-latency"  # reads the fleet topics ingest republishes after commit
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def machine() -> str:
    """One line naming the machine and its load, printed above every result table."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    memory = psutil.virtual_memory().total / 1024**3
    return f"{os.cpu_count()} cores ({cpu}), {memory:.1f} GiB RAM, load average {load}"


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes and their children so far (0 for gone ones)."""
    return sum(cpu_by_pid(pids).values())


def cpu_by_pid(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds per process (the given ones and their children) right now."""
    found: dict[int, float] = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for each in (process, *process.children(recursive=True)):
                times = each.cpu_times()
                found[each.pid] = times.user + times.system
        except psutil.Error:
            continue
    return found


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two cpu_by_pid snapshots by the processes alive at the second.

    Processes that started in between count from zero; ones that ended in between are lost
    (PostgreSQL backends of short connections), so the figure is a lower bound, never negative.
    """
    return sum(max(0.0, cpu - before.get(pid, 0.0)) for pid, cpu in after.items())


def postgres_pids() -> list[int]:
    """The local PostgreSQL server's processes (shared with whatever else uses the server)."""
    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which `fraction` of the sorted values lie (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[rank]


@dataclass(frozen=True, slots=True)
class Broker:
    """A running Mosquitto started for one measurement."""

    port: int
    process: MosquittoProcess


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


class Platform:
    """A temporary data dir with a fleet PKI, a fresh Postgres database, and brokers on demand.

    `with Platform() as platform:`; leaving stops every broker and subprocess and drops the database.
    """

    def __init__(self, admin_url: str | None = None) -> None:
        self.admin_url = admin_url or os.environ.get("KERNEX_BENCH_POSTGRES_URL", DEFAULT_ADMIN_URL)
        self.data_dir = Path(tempfile.mkdtemp(prefix="kernex-bench-"))
        self.settings = BrokerSettings(data_dir=self.data_dir)
        self.pki = FleetPKI.from_settings(self.settings)
        self.pki.init()
        cert, key = IntegratorRegistry(self.pki).create(BENCH_INTEGRATOR, self.data_dir / "integrator")[1:]
        self.integrator_cert, self.integrator_key = cert, key
        self.db_name = f"kernex_bench_{uuid.uuid4().hex[:10]}"
        self.database_url = (
            self.admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
            + f"/{self.db_name}"
        )
        self._brokers: list[MosquittoProcess] = []
        self._profiles = 0
        self._started = 0  # brokers started so far: each gets its own (empty) persistence dir
        self._children: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Self:
        # SIGTERM (`kill`, a CI timeout) would end the benchmark without __exit__, leaving its
        # broker, ingest workers, API and simulator running and its database behind: as an
        # exception it unwinds like Ctrl-C does.
        signal.signal(signal.SIGTERM, _terminated)
        asyncio.run(self._admin(f'CREATE DATABASE "{self.db_name}"'))
        upgrade(self.database_url)
        return self

    def __exit__(self, *_exc: object) -> None:
        for child in self._children:
            stop_process(child)
        for broker in self._brokers:
            broker.stop()
        asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        shutil.rmtree(self.data_dir, ignore_errors=True)

    async def _admin(self, statement: str) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    @property
    def dsn(self) -> str:
        """The database as a plain libpq URL (for asyncpg)."""
        return self.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)

    def start_broker(self) -> Broker:
        """A fresh Mosquitto from the project's template on a free port (nothing queued from earlier runs)."""
        self._started += 1
        out_dir = self.data_dir / f"broker-{self._started}"
        rendered = render(self.settings, self.pki, out_dir, port=free_port(), bind_address=HOST)
        process = MosquittoProcess.for_rendered(rendered, self.pki)
        process.start()
        self._brokers.append(process)
        return Broker(rendered.port, process)

    def stop_broker(self, broker: Broker) -> None:
        """Stop a broker started by start_broker."""
        broker.process.stop()
        self._brokers.remove(broker.process)

    def kernex_env(self, broker: Broker | None = None, **settings: str) -> dict[str, str]:
        """The environment of a `kernex` subprocess pointed at this platform."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KERNEX_")}
        env.update(
            KERNEX_DATA_DIR=str(self.data_dir),
            KERNEX_DATABASE_URL=self.database_url,
            KERNEX_LOG_LEVEL="warning",
            KERNEX_TOPIC_PREFIX=DEFAULT_PREFIX,
        )
        if broker is not None:
            env.update(KERNEX_MQTT_HOST=HOST, KERNEX_MQTT_PORT=str(broker.port))
        env.update({f"KERNEX_{k.upper()}": v for k, v in settings.items()})
        return env

    def spawn(self, args: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """A `kernex` subprocess, stopped (SIGTERM, then kill) when the platform closes.

        With KERNEX_BENCH_PROFILE=<dir> it runs under cProfile, writing <dir>/<command>-<pid>.prof
        when it stops: how the ingest bottleneck was found (docs/performance.md).
        """
        command = [str(BIN / "kernex")]
        profile_dir = os.environ.get("KERNEX_BENCH_PROFILE")
        if profile_dir:
            self._profiles += 1
            out = Path(profile_dir) / f"{args[0]}-{self._profiles}.prof"
            command = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "kernex"]
        child = subprocess.Popen([*command, *args], env=env, stdout=subprocess.DEVNULL)
        self._children.append(child)
        return child

    def stop(self, child: subprocess.Popen[bytes]) -> None:
        """Stop a subprocess started by spawn (it flushes on SIGTERM)."""
        stop_process(child)
        self._children.remove(child)

    def create_devices(self, count: int, key_type: KeyType = KeyType.ECDSA_P256) -> list[DeviceSpec]:
        """`count` active devices: a signing key (its public half in the devices table) and a
        client certificate with the device id as CN for the broker."""
        directory = self.data_dir / "devices"
        directory.mkdir(mode=0o700, exist_ok=True)
        specs: list[DeviceSpec] = []
        rows: list[tuple[object, ...]] = []
        for _ in range(count):
            key = generate_private_key(key_type)
            public = key.public_key()
            device_id = device_id_for(public)
            # The TLS key is a separate P-256 key: the broker only checks the certificate's CN.
            cert_path, key_path = self.pki.issue_client_certificate(device_id, directory)
            specs.append(
                DeviceSpec(device_id, private_key_to_pem(key).decode("ascii"), str(cert_path), str(key_path))
            )
            fingerprint = public_key_fingerprint(public)
            rows.append((device_id, key_type_of(public).value, public_key_to_pem(public), fingerprint))
        asyncio.run(self._insert_devices(rows))
        return specs

    async def _insert_devices(self, rows: list[tuple[object, ...]]) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.executemany(
                "INSERT INTO devices (id, key_type, public_key_pem, key_fingerprint, state, status, tags, "
                "registered_at, updated_at, command_revision) "
                "VALUES ($1, $2, $3, $4, 'active', 'unknown', '[]', now(), now(), 0)",
                rows,
            )
        finally:
            await conn.close()

    async def reset_heartbeats(self) -> None:
        """Empty what ingest wrote, so each measurement starts from the same state."""
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute("TRUNCATE heartbeats, device_status_changes, webhook_deliveries")
            await conn.execute(
                "UPDATE devices SET last_seq = NULL, last_heartbeat_at = NULL, last_seen_at = NULL, "
                "status = 'unknown', status_changed_at = NULL"
            )
            await conn.execute("VACUUM ANALYZE heartbeats")
        finally:
            await conn.close()

    async def heartbeat_count(self) -> int:
        """Rows in the heartbeats table."""
        conn = await asyncpg.connect(self.dsn)
        try:
            value: int = await conn.fetchval("SELECT count(*) FROM heartbeats")
        finally:
            await conn.close()
        return value


def stop_process(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM, wait, then kill."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def wait_http(url: str, child: subprocess.Popen[bytes], what: str, *, contains: str | None = None) -> None:
    """Poll url until it answers (with `contains` in its body, when given)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise SystemExit(f"{what} exited with {child.returncode}")
        try:
            response = httpx.get(url, timeout=2)
        except httpx.HTTPError:
            pass
        else:
            if contains is None or contains in response.text:
                return
        time.sleep(0.2)
    raise SystemExit(f"{what} was not ready within {READY_TIMEOUT_S} s")


@contextmanager
def timed() -> Iterator[list[float]]:
    """Wall-clock seconds of the block, in the yielded list once it ends."""
    box: list[float] = []
    started = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - started)
