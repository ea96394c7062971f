"""A load generator for the benchmarks: many devices' pre-signed QoS 1 heartbeats over mTLS.

Each publisher process holds one real mutual-TLS MQTT 5 connection per device (the broker's
ACL only lets a device publish on its own topics), signs all its heartbeats before the clock
starts, and writes pre-encoded PUBLISH packets on a fixed schedule (or as fast as the broker
acknowledges). It speaks the few MQTT 5 packets it needs itself (CONNECT, PUBLISH QoS 1,
PUBACK, DISCONNECT) instead of going through paho: paho's per-message Python work would make
the publisher, not the system under test, the bottleneck on a 2-core machine.

Run in spawned processes by benchmarks.ingest and benchmarks.fleet (see `publish_process`).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from kernex.protocol import jws
from kernex.protocol.keys import load_private_key_pem
from kernex.protocol.messages import format_ts, utc_now
from kernex.protocol.topics import Topics

PROTOCOL_LEVEL_V5 = 5
CONNECT_FLAG_CLEAN_START = 0x02
KEEPALIVE_S = 120  # nothing else is sent while idle; the run is far shorter
PACKET_CONNECT = 0x10
PACKET_CONNACK = 0x20
PACKET_PUBLISH_QOS1 = 0x32
PACKET_PUBACK = 0x40
PACKET_DISCONNECT = b"\xe0\x00"
REASON_FAILURE_MIN = 0x80  # MQTT 5: reason codes of 0x80 and above are failures
MAX_PACKET_ID = 65_535
# Below Mosquitto's default Receive Maximum (20): more in flight gets the client disconnected.
DEFAULT_WINDOW = 16
CONNECT_CONCURRENCY = 64  # TLS handshakes in parallel while connecting a process's devices
CONNECT_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 120.0
SLEEP_GRANULARITY_S = 0.002  # the schedule sleeps only when this far ahead: fewer wake-ups


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(2, "big") + data


def connect_packet(client_id: str) -> bytes:
    """CONNECT, MQTT 5, clean start, no properties, no credentials (the certificate is the login)."""
    body = (
        _utf8("MQTT")
        + bytes([PROTOCOL_LEVEL_V5, CONNECT_FLAG_CLEAN_START])
        + KEEPALIVE_S.to_bytes(2, "big")
        + _varint(0)
        + _utf8(client_id)
    )
    return bytes([PACKET_CONNECT]) + _varint(len(body)) + body


def publish_packet(topic: str, packet_id: int, payload: bytes) -> bytes:
    """PUBLISH with QoS 1, no properties."""
    body = _utf8(topic) + packet_id.to_bytes(2, "big") + _varint(0) + payload
    return bytes([PACKET_PUBLISH_QOS1]) + _varint(len(body)) + body


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One simulated device: its signing key, and the client certificate the broker checks."""

    device_id: str
    key_pem: str
    cert_path: str
    key_path: str


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What one publisher process sends."""

    host: str
    port: int
    ca_path: str
    topic_prefix: str
    devices: list[DeviceSpec]
    first_seq: int
    per_device: int
    rate: float | None  # messages per second from this process; None: as fast as acknowledged
    window: int = DEFAULT_WINDOW


@dataclass(slots=True)
class LoadResult:
    """What one publisher process did: publish times per (device_id, seq), refusals."""

    published: dict[tuple[str, int], float] = field(default_factory=dict)
    acked: int = 0
    refused: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    sign_s: float = 0.0


class _Connection(asyncio.Protocol):
    """Counts PUBACKs and keeps the in-flight window; nothing else arrives on a publish-only link."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.inflight = 0
        self.acked = 0
        self.refused = 0
        self.room = asyncio.Event()
        self.closed = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"closed before CONNACK: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.room.set()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 2:
            length, shift, pos = 0, 0, 1
            while True:
                if pos >= len(buffer):
                    return
                byte = buffer[pos]
                length |= (byte & 0x7F) << shift
                shift += 7
                pos += 1
                if not byte & 0x80:
                    break
            end = pos + length
            if len(buffer) < end:
                return
            kind, body = buffer[0] & 0xF0, bytes(buffer[pos:end])
            del buffer[:end]
            if kind == PACKET_PUBACK:
                self.inflight -= 1
                self.acked += 1
                if len(body) > 2 and body[2] >= REASON_FAILURE_MIN:
                    self.refused += 1
                self.room.set()
            elif kind == PACKET_CONNACK and not self.connack.done():
                self.connack.set_result(body[1] if len(body) > 1 else 0)


def _sign_all(spec: LoadSpec) -> tuple[list[str], list[list[bytes]]]:
    """Every device's PUBLISH packets, signed now (before the clock starts)."""
    topics = Topics(spec.topic_prefix)
    ids: list[str] = []
    packets: list[list[bytes]] = []
    for device in spec.devices:
        key = load_private_key_pem(device.key_pem.encode("ascii"))
        topic = topics.heartbeat(device.device_id)
        own: list[bytes] = []
        for k in range(spec.per_device):
            seq = spec.first_seq + k
            claims = {
                "device_id": device.device_id,
                "seq": seq,
                "ts": format_ts(utc_now()),
                "status": "ok",
                "metrics": {"cpu_percent": 12.5, "memory_mb": 512, "disk_free_mb": 2048, "uptime_s": seq},
                "bundle": {"id": "bundle-bench", "version": "1.0.0"},
                "config_version": 1,
                "agent_version": "bench",
            }
            token = jws.sign_claims(claims, key, kid=device.device_id, typ=jws.TYP_HEARTBEAT)
            own.append(publish_packet(topic, k % MAX_PACKET_ID + 1, token.encode("ascii")))
        ids.append(device.device_id)
        packets.append(own)
    return ids, packets


async def _connect(spec: LoadSpec, device: DeviceSpec, gate: asyncio.Semaphore) -> _Connection:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=spec.ca_path)
    context.load_cert_chain(device.cert_path, device.key_path)
    loop = asyncio.get_running_loop()
    async with gate:
        _transport, conn = await loop.create_connection(
            _Connection, spec.host, spec.port, ssl=context, server_hostname=spec.host
        )
        assert conn.transport is not None
        conn.transport.write(connect_packet(device.device_id))
        reason = await asyncio.wait_for(conn.connack, CONNECT_TIMEOUT_S)
    if reason >= REASON_FAILURE_MIN:
        raise ConnectionError(f"{device.device_id}: CONNACK reason {reason:#x}")
    return conn


async def _run(spec: LoadSpec, pipe: Connection) -> LoadResult:
    result = LoadResult()
    started = time.perf_counter()
    ids, packets = _sign_all(spec)
    result.sign_s = time.perf_counter() - started
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    conns = await asyncio.gather(*(_connect(spec, d, gate) for d in spec.devices))
    pipe.send(("ready", len(conns)))
    # The parent answers with the common start time (time.monotonic is system-wide on Linux).
    start_at: float = await asyncio.to_thread(pipe.recv)
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    interval = 1.0 / spec.rate if spec.rate else 0.0
    begin = time.monotonic()
    published = result.published
    window = spec.window
    sent = 0
    for k in range(spec.per_device):
        for index, conn in enumerate(conns):
            if interval:
                ahead = begin + sent * interval - time.monotonic()
                if ahead > SLEEP_GRANULARITY_S:
                    await asyncio.sleep(ahead)
            while conn.inflight >= window:
                conn.room.clear()
                await conn.room.wait()
            assert conn.transport is not None
            conn.transport.write(packets[index][k])
            conn.inflight += 1
            published[(ids[index], spec.first_seq + k)] = time.monotonic()
            sent += 1
            if not interval and sent % 256 == 0:
                await asyncio.sleep(0)  # let PUBACKs in
    result.first_at = begin
    result.last_at = time.monotonic()
    async with asyncio.timeout(DRAIN_TIMEOUT_S):
        for conn in conns:
            while conn.inflight > 0:
                conn.room.clear()
                await conn.room.wait()
    for conn in conns:
        assert conn.transport is not None
        conn.transport.write(PACKET_DISCONNECT)
        conn.transport.close()
    await asyncio.gather(*(c.closed for c in conns))
    result.acked = sum(c.acked for c in conns)
    result.refused = sum(c.refused for c in conns)
    return result


def publish_process(spec: LoadSpec, pipe: Connection) -> None:
    """Process entry point: sign, connect, say ready, wait for the start time, publish, report."""
    try:
        result = asyncio.run(_run(spec, pipe))
    except Exception as exc:
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    pipe.send(("done", result))
