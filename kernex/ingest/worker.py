"""The ingest worker: MQTT in, verified rows out, acknowledgements only after commit.

Flow (DESIGN.md "Delivery guarantees"):

    paho network thread ────────Handoff─────────▶ Inbox ──▶ collect: batch + verify
                                                              │ (one batch ahead)
                                                              ▼
                  commit: write in one transaction ──▶ republish on fleet/... ──▶ PUBACK every message

- A persistent MQTT 5 session (fixed client id, clean_start=False, session expiry > 0) makes the
  broker keep unacknowledged and newly published messages while the worker is away.
- paho acknowledges nothing by itself (`manual_ack`); a batch's messages, rejected ones
  included, are acknowledged in arrival order after the batch committed. A failed write is
  retried with backoff and never acknowledged, so a crash at any point loses nothing: the
  broker redelivers, and (device_id, seq) makes the rewrite a no-op.
- Heartbeats and events come through shared subscriptions, so N workers split the fleet.
  Status comes through a plain subscription on every worker: Mosquitto does not send retained
  messages to shared subscriptions, and the latest statuses are retained. Applying a status
  is idempotent (newest ts wins, under a row lock), so every worker applying it is harmless,
  and each worker learns every device's current status when it first subscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

import sqlalchemy as sa
from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage, MQTTv5
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from prometheus_client import start_http_server
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.broker.exceptions import PKIError
from kernex.broker.pki import INGEST_IDENTITY, FleetPKI
from kernex.ingest.exceptions import BrokerConnectionError, IngestConfigError, IngestError, WriteError
from kernex.ingest.fleet import FLEET_MAX_QUEUED, FleetRepublisher
from kernex.ingest.fleet import queue as queue_fleet
from kernex.ingest.inbox import Handoff, Inbox, Incoming
from kernex.ingest.keys import KeyCache
from kernex.ingest.metrics import IngestMetrics, Outcome
from kernex.ingest.retention import run_retention
from kernex.ingest.revocations import RevocationAnnouncer
from kernex.ingest.settings import IngestSettings
from kernex.ingest.verifier import (
    RawMessage,
    Rejection,
    Verdict,
    Verified,
    VerifiedEvent,
    VerifiedHeartbeat,
    Verifier,
    VerifyLimits,
)
from kernex.ingest.writer import BatchWriter, WriteResult
from kernex.kit.backoff import Backoff
from kernex.kit.logs import get_logger
from kernex.protocol.exceptions import TopicError
from kernex.protocol.messages import RejectReason
from kernex.protocol.topics import Channel, Topics
from kernex.storage.database import create_engine

log = get_logger(__name__)

CONNECT_TIMEOUT_S = 15.0  # TCP + TLS handshake + CONNACK + SUBACK, on a busy broker
KEEPALIVE_S = 30  # a silently dead connection is noticed within 1.5 x this
# paho's own reconnect loop (after the first connection): fast enough to resume within a
# second or two of a broker restart, capped so a long outage costs one attempt per 30 s.
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
RECEIVE_MAXIMUM_LIMIT = 65_535  # MQTT 5 Receive Maximum is a two-byte integer
# Write retries: the first retry comes quickly (a deadlock victim, a failover), later ones
# back off to a pace that does not add load to a database that is struggling.
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0
# One warning line per interval summarises rejections: a flood of bad messages must not
# flood the logs (each rejection is still logged at debug and counted in metrics).
REJECTION_WARNING_INTERVAL_S = 10.0
UNDECODABLE_TOPIC = "<topic is not UTF-8>"  # rejected as malformed, and still acknowledged


class _RejectionLog:
    """Debug line per rejection, and at most one warning per interval with the counts."""

    def __init__(self, interval_s: float = REJECTION_WARNING_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._counts: Counter[str] = Counter()
        # The first rejections are reported at once; later ones wait for the interval to pass.
        self._since = time.monotonic() - interval_s

    def add(self, rejection: Rejection) -> None:
        self._counts[rejection.reason.value] += 1
        log.debug(
            "message rejected",
            device_id=rejection.device_id,
            channel=rejection.channel,
            reason=rejection.reason.value,
            detail=rejection.detail,
        )

    def flush(self) -> None:
        now = time.monotonic()
        if self._counts and now - self._since >= self._interval_s:
            log.warning("messages rejected", counts=dict(self._counts), over_s=round(now - self._since, 1))
            self._counts.clear()
            self._since = now


class IngestWorker:
    """One ingest worker: `async with IngestWorker(settings) as worker: await worker.wait()`.

    Entering connects to the broker (raising BrokerConnectionError if the first connection
    fails) and starts consuming. Leaving, whether normally or by cancellation, stops taking
    messages, commits and acknowledges what was buffered, then disconnects, keeping the
    broker-side session so a restart resumes it. The worker cannot be re-entered.
    """

    def __init__(
        self,
        settings: IngestSettings,
        *,
        metrics: IngestMetrics | None = None,
        engine: AsyncEngine | None = None,
        pki: FleetPKI | None = None,
    ) -> None:
        self.settings = settings
        # A secret: never logged (see IngestSettings.share_group).
        self._share_group = settings.resolved_share_group()
        self.metrics = metrics if metrics is not None else IngestMetrics()
        self._own_engine = engine is None
        self.engine = engine if engine is not None else create_engine(settings.resolved_database_url)
        self._pki = pki
        try:
            self.topics = Topics(settings.topic_prefix)
        except TopicError as exc:
            raise IngestConfigError(str(exc)) from None
        self.keys = KeyCache(self.engine, settings.key_cache_ttl_s)
        self.verifier = Verifier(
            self.topics,
            VerifyLimits(
                max_payload_bytes=settings.max_payload_bytes,
                max_future_skew=timedelta(seconds=settings.max_future_skew_s),
                max_age=timedelta(seconds=settings.max_age_s),
            ),
        )
        self.writer = BatchWriter(self.engine)
        self.fleet = FleetRepublisher(self.topics, self.metrics)
        self.revocations = RevocationAnnouncer(
            self.engine, self.topics, self.keys, self.metrics, settings.revocation_poll_interval_s
        )
        # Room for the batch being committed, the one verified ahead, and the one filling.
        self.capacity = min(RECEIVE_MAXIMUM_LIMIT, 3 * settings.batch_max)
        self._inbox = Inbox(self.capacity, self.metrics)
        self._client: Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handoff: Handoff | None = None
        self._runner: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self._entered = False
        self._stopping = False
        self._rejections = _RejectionLog()
        # Guards `_connection`, which counts broker connections. Packet ids are per connection:
        # after a reconnect the broker redelivers unacknowledged messages (possibly under ids
        # that then get reused), so a message is only acknowledged on the connection that
        # delivered it; its redelivered copy gets acknowledged instead.
        self._ack_lock = threading.Lock()
        self._connection = 0
        self._connected_once = False
        self._ready: asyncio.Future[None] | None = None
        self._subscribe_mid: int | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise IngestError("an IngestWorker runs once; create a new one")
        self._entered = True
        self._loop = asyncio.get_running_loop()
        self._handoff = Handoff(self._loop, self._inbox.put)
        self._ready = self._loop.create_future()
        try:
            client = self._make_client()
            self._client = client
            await self._connect(client)
        except BaseException:
            await self._close_resources()
            raise
        self._runner = asyncio.create_task(self._run(), name=f"ingest-{self.settings.client_id}")
        self._retention = asyncio.create_task(
            run_retention(self.engine, self.settings.heartbeat_retention_days), name="ingest-retention"
        )
        log.info(
            "ingest worker started",
            client_id=self.settings.client_id,
            batch_max=self.settings.batch_max,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop taking messages, commit and acknowledge the buffered ones, disconnect."""
        if self._stopping:
            return
        self._stopping = True
        self._inbox.close()
        if self._retention is not None:
            self._retention.cancel()
            # Cancelled on purpose: it ends with CancelledError and nothing else to report.
            await asyncio.wait({self._retention})
        try:
            if self._runner is not None:
                # Awaited, not shielded: a second cancellation (a second Ctrl-C) abandons the
                # flush, and the broker redelivers whatever was not acknowledged.
                await self._runner
        finally:
            left = len(self._inbox)
            if left:
                self.metrics.pending_acks.dec(left)
            await self._close_resources()
            log.info("ingest worker stopped", client_id=self.settings.client_id)

    async def wait(self) -> None:
        """Run until the worker stops; raises if one of its tasks failed.

        Shielded: cancelling wait() (e.g. run_ingest being cancelled) leaves the flush to
        aclose() instead of interrupting a commit.
        """
        if self._runner is None:
            raise IngestError("the worker is not running: use it as an async context manager")
        await asyncio.shield(self._runner)

    async def _close_resources(self) -> None:
        client = self._client
        if client is not None:
            client.disconnect()
            # loop_stop joins paho's thread: not on the event loop.
            await asyncio.to_thread(client.loop_stop)
        if self._own_engine:
            await self.engine.dispose()

    # --- broker --------------------------------------------------------------------------------

    def _make_client(self) -> Client:
        pki = self._pki if self._pki is not None else FleetPKI.from_settings(self.settings)
        try:
            context = pki.client_ssl_context(INGEST_IDENTITY)
        except (OSError, ssl.SSLError, PKIError) as exc:
            raise IngestConfigError(
                f"cannot load the {INGEST_IDENTITY} certificate from {pki.directory}: {exc} "
                "(run `kernex pki init`)"
            ) from None
        client = Client(CallbackAPIVersion.VERSION2, client_id=self.settings.client_id, protocol=MQTTv5)
        client.manual_ack_set(on=True)
        client.tls_set_context(context)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        # Fleet republication (kernex.ingest.fleet): every queued message goes on the wire at
        # once, ahead of the batch's acknowledgements, and the queue is bounded.
        # No in-flight window (0), only the queue bound: with a window, paho scans every
        # outstanding message on each PUBACK (Client._update_inflight), which at a 10,000
        # window was 20 % of a worker's CPU (py-spy); the queue bound caps outstanding alike.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(FLEET_MAX_QUEUED)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    async def _connect(self, client: Client) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
        properties.SessionExpiryInterval = self.settings.session_expiry_s
        # The broker sends at most this many unacknowledged QoS 1 messages: the inbox's bound.
        properties.ReceiveMaximum = self.capacity
        host, port = self.settings.mqtt_host, self.settings.mqtt_port
        try:
            # connect() resolves, opens TCP and does the TLS handshake: blocking, so in a thread.
            await asyncio.to_thread(
                client.connect, host, port, KEEPALIVE_S, clean_start=False, properties=properties
            )
        except (OSError, ValueError) as exc:
            raise BrokerConnectionError(f"cannot connect to mqtts://{host}:{port}: {exc}") from None
        client.loop_start()
        assert self._ready is not None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await self._ready
        except TimeoutError:
            raise BrokerConnectionError(
                f"no CONNACK/SUBACK from mqtts://{host}:{port} within {CONNECT_TIMEOUT_S} s"
            ) from None

    def _subscriptions(self) -> list[tuple[str, SubscribeOptions]]:
        group = self._share_group
        return [
            (self.topics.shared(Channel.HEARTBEAT, group), SubscribeOptions(qos=1)),
            (self.topics.shared(Channel.EVENTS, group), SubscribeOptions(qos=1)),
            # Not shared, see the module docstring. Retained statuses are sent when the session
            # first subscribes; a resumed session already has them or has them queued.
            (
                self.topics.all_devices(Channel.STATUS),
                SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB),
            ),
        ]

    def _resolve_ready(self, error: BaseException | None) -> None:
        """Complete the first-connection future from paho's thread (once)."""
        ready, loop = self._ready, self._loop
        if ready is None or loop is None or ready.done():
            return

        def resolve() -> None:
            if ready.done():
                return
            if error is None:
                ready.set_result(None)
            else:
                ready.set_exception(error)

        loop.call_soon_threadsafe(resolve)

    # paho callbacks: they run in paho's network thread and must never raise into it.

    def _on_connect(
        self,
        client: Client,
        _userdata: Any,
        flags: ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection", reason=str(reason_code))
            self._resolve_ready(BrokerConnectionError(f"broker refused the connection: {reason_code}"))
            return
        with self._ack_lock:
            self._connection += 1
            connection = self._connection
        if self._connected_once and flags.session_present and self._loop is not None:
            # The resumed session resends what the old connection delivered and we did not
            # acknowledge: the buffered copies are dropped (kernex.ingest.inbox).
            self._loop.call_soon_threadsafe(self._drop_stale, connection)
        if self._connected_once and not flags.session_present:
            # The session expired (or the broker lost it): whatever was published while this
            # worker was away beyond session_expiry_s, and not taken by another worker, is gone.
            log.warning("broker had no session for this worker; subscribing afresh")
        else:
            log.info("connected to broker", session_present=flags.session_present)
        self._connected_once = True
        result, mid = client.subscribe(self._subscriptions())
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.error("subscribe failed", error=str(result))
        self._subscribe_mid = mid

    def _drop_stale(self, connection: int) -> None:
        dropped = self._inbox.drop_older_than(connection)
        if dropped:
            log.info(
                "dropped buffered messages of the previous connection; the broker resends them", count=dropped
            )

    def _on_subscribe(
        self,
        _client: Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            log.error("broker refused subscriptions", reasons=refused)
            self._resolve_ready(BrokerConnectionError(f"broker refused the subscriptions: {refused}"))
        else:
            self.metrics.connected.set(1)
            self._resolve_ready(None)

    def _on_disconnect(
        self,
        _client: Client,
        _userdata: Any,
        _flags: DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        with self._ack_lock:
            self._connection += 1
        self.metrics.connected.set(0)
        if self._stopping:
            log.info("disconnected from broker")
        else:
            log.warning("lost the broker connection; reconnecting", reason=str(reason_code))

    def _on_message(self, _client: Client, _userdata: Any, message: MQTTMessage) -> None:
        received_at = datetime.now(UTC)
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = UNDECODABLE_TOPIC
        item = Incoming(
            mid=message.mid,
            qos=message.qos,
            topic=topic,
            payload=bytes(message.payload),
            received_at=received_at,
            connection=self._connection,  # written only by this same thread
        )
        handoff = self._handoff
        if handoff is None:
            return
        try:
            handoff.put(item)
        except RuntimeError:
            # The event loop has closed: the message stays unacknowledged and is redelivered.
            log.debug("message arrived after the event loop closed", mid=item.mid)

    # --- pipeline ------------------------------------------------------------------------------

    async def _run(self) -> None:
        # One batch is verified while the previous one commits; the queue of one keeps
        # verification from running further ahead than that.
        verified: asyncio.Queue[tuple[list[Incoming], list[Verdict]] | None] = asyncio.Queue(maxsize=1)
        # Beside the pipeline, not in its group: it runs until the pipeline has drained.
        announcing = asyncio.create_task(self.revocations.run(self._queue_fleet), name="ingest-revocations")
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._collect(verified), name="ingest-collect")
                group.create_task(self._commit(verified), name="ingest-commit")
        finally:
            announcing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await announcing

    def _queue_fleet(self, topic: str, payload: bytes, qos: int) -> bool:
        client = self._client
        return client is not None and queue_fleet(client, topic, payload, qos)

    async def _collect(self, out: asyncio.Queue[tuple[list[Incoming], list[Verdict]] | None]) -> None:
        delay_s = self.settings.batch_max_delay_ms / 1000
        try:
            while batch := await self._inbox.get_batch(self.settings.batch_max, delay_s):
                verdicts = await self._verify(batch)
                await out.put((batch, verdicts))
        finally:
            # Also on failure, so the commit stage finishes what it holds instead of waiting.
            await out.put(None)

    async def _verify(self, batch: list[Incoming]) -> list[Verdict]:
        """Verify a batch; keys come from the cache, which may need the database."""
        device_ids = {d for m in batch if (d := self.verifier.device_id_of(m.topic)) is not None}
        backoff = Backoff(RETRY_INITIAL_S, RETRY_MAX_S)
        while True:
            try:
                keys = await self.keys.get_many(device_ids)
                break
            except (OSError, sa.exc.SQLAlchemyError) as exc:
                self.metrics.db_errors.inc()
                delay = backoff.next_delay()
                log.warning("device key lookup failed; retrying", error=str(exc), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
        # CPU-bound signature checks, kept a separate step so they can move to a process pool.
        return [self.verifier.verify(RawMessage(m.topic, m.payload, m.received_at), keys.get) for m in batch]

    async def _commit(self, incoming: asyncio.Queue[tuple[list[Incoming], list[Verdict]] | None]) -> None:
        while (item := await incoming.get()) is not None:
            batch, verdicts = item
            accepted: list[Verified] = [v for v in verdicts if not isinstance(v, Rejection)]
            result = await self._write(accepted) if accepted else WriteResult()
            if result is None:
                continue  # shutting down with the database away: left to redelivery
            if accepted:
                assert self._client is not None
                self.fleet.publish(self._client, result)
            self._ack(batch)
            self._record(verdicts, result)

    async def _write(self, accepted: list[Verified]) -> WriteResult | None:
        """Commit the batch, retrying with backoff; None if given up on during shutdown."""
        backoff = Backoff(RETRY_INITIAL_S, RETRY_MAX_S)
        while True:
            started = time.perf_counter()
            try:
                result = await self.writer.write(accepted)
            except WriteError as exc:
                self.metrics.db_errors.inc()
                if self._stopping:
                    log.error(  # noqa: TRY400 - the cause is in the message; no traceback to add
                        "batch not committed at shutdown; the broker will redeliver it",
                        messages=len(accepted),
                        error=str(exc),
                    )
                    return None
                delay = backoff.next_delay()
                log.warning("batch write failed; retrying", error=str(exc), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
            return result

    def _ack(self, batch: list[Incoming]) -> None:
        """Acknowledge a committed batch, in arrival order (MQTT 5 section 4.6)."""
        client = self._client
        assert client is not None
        stale = failed = 0
        with self._ack_lock:
            current = self._connection
            for item in batch:
                if item.connection != current:
                    stale += 1  # delivered on an earlier connection: its redelivery is acked
                elif client.ack(item.mid, item.qos) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    failed += 1
        self.metrics.pending_acks.dec(len(batch))
        if stale or failed:
            log.info("acknowledgements left to redelivery", stale=stale, failed=failed)

    def _record(self, verdicts: list[Verdict], result: WriteResult) -> None:
        """Count outcomes once the batch committed."""
        m = self.metrics
        m.batch_size.observe(len(verdicts))
        for verdict in verdicts:
            if isinstance(verdict, Rejection):
                m.reject(verdict.channel, verdict.reason)
                self._rejections.add(verdict)
            elif isinstance(verdict, VerifiedHeartbeat | VerifiedEvent):
                lag = (verdict.received_at - verdict.claims.ts).total_seconds()
                m.lag_seconds.observe(max(lag, 0.0))
        for channel, tally in (
            (Channel.HEARTBEAT, result.heartbeats),
            (Channel.EVENTS, result.events),
            (Channel.STATUS, result.statuses),
        ):
            m.count(channel.value, Outcome.ACCEPTED, tally.stored)
            m.count(channel.value, Outcome.DUPLICATE, tally.duplicate)
            for _ in range(tally.vanished):
                m.reject(channel.value, RejectReason.UNKNOWN_DEVICE)
        m.seq_gaps.inc(result.seq_gaps)
        m.seq_late.inc(result.seq_late)
        self._rejections.flush()
        log.debug(
            "batch committed",
            size=len(verdicts),
            heartbeats=result.heartbeats.stored,
            events=result.events.stored,
            duplicates=result.heartbeats.duplicate + result.events.duplicate,
            status_changes=result.status_changes,
        )


async def run_ingest(settings: IngestSettings) -> None:
    """Run one ingest worker until cancelled (the `kernex ingest` command).

    Serves Prometheus metrics on metrics_host:metrics_port unless the port is 0; configures
    nothing else global (logging is the caller's).
    """
    metrics = IngestMetrics()
    server = None
    if settings.metrics_port:
        server, _thread = start_http_server(settings.metrics_port, settings.metrics_host, metrics.registry)
        log.info("metrics served", url=f"http://{settings.metrics_host}:{settings.metrics_port}/metrics")
    try:
        async with IngestWorker(settings, metrics=metrics) as worker:
            await worker.wait()
    finally:
        if server is not None:
            # shutdown() waits for the serving thread's poll loop to notice: off the event loop.
            await asyncio.to_thread(server.shutdown)
            server.server_close()
