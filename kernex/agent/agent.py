"""The device agent: register, hold a mutual-TLS MQTT v5 session, publish signed heartbeats.

Heartbeats are produced on a fixed schedule into the outbox whether or not the broker is
reachable; one publisher per connection drains the outbox in order. The connection loop
reconnects forever with backoff, announcing "online" (retained) on every connect and leaving
"offline" as its Last Will; a clean shutdown publishes "offline" itself, because the broker
sends the Will only when a client vanishes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aiomqtt
import httpx
import structlog

from kernex import __version__
from kernex.agent.identity import Identity, load_or_create
from kernex.agent.outbox import Outbox, OutgoingMessage
from kernex.agent.registration import Registrar
from kernex.agent.sequence import Sequence
from kernex.agent.settings import AgentSettings
from kernex.agent.state import StateStore
from kernex.agent.telemetry import Telemetry
from kernex.kit.backoff import Backoff
from kernex.kit.logs import get_logger
from kernex.protocol import jws
from kernex.protocol.exceptions import TopicError
from kernex.protocol.messages import ConnectionStatus, RegistrationResponse, format_ts, utc_now
from kernex.protocol.topics import Topics

RECONNECT_INITIAL_S = 1.0  # the contract: reconnect backoff from 1 s ...
RECONNECT_MAX_S = 60.0  # ... to a minute, with full jitter so a fleet does not reconnect in waves
# The broker declares a silent device gone (and publishes its Last Will) after 1.5 x keepalive.
KEEPALIVE_S = 60
MQTT_TIMEOUT_S = 10.0  # connect, subscribe and publish acknowledgements; a healthy broker takes ms
GOODBYE_TIMEOUT_S = 2.0  # a shutdown waits this long for the broker to take the "offline" status
# Backoff restarts from its initial delay only after a connection held this long, so a broker
# that accepts and immediately drops the device (e.g. a revoked certificate) is not hammered.
STABLE_CONNECTION_S = 30.0
QOS_AT_LEAST_ONCE = 1  # DESIGN.md: every device message is QoS 1

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class AgentStats:
    """A snapshot of the agent's counters, for tests and status displays."""

    device_id: str | None
    connected: bool
    connects: int
    published: int
    buffered: int
    dropped: int
    received: int
    last_seq: int | None


def status_payload(status: ConnectionStatus) -> bytes:
    """The unsigned, retained status message."""
    return json.dumps({"status": status.value, "ts": format_ts(utc_now())}, separators=(",", ":")).encode()


class Agent:
    """One device: `await Agent(settings).run()` runs until cancelled or refused for good."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        http: httpx.AsyncClient | None = None,
        telemetry: Telemetry | None = None,
        reconnect_backoff: Backoff | None = None,
        registration_backoff: Backoff | None = None,
    ) -> None:
        """`http` and `telemetry` may be shared between agents (the simulator runs thousands)."""
        self.settings = settings
        self._http = http
        self._telemetry = telemetry or Telemetry(settings.state_dir)
        self._reconnect_backoff = reconnect_backoff or Backoff(
            initial_s=RECONNECT_INITIAL_S, max_s=RECONNECT_MAX_S
        )
        self._registration_backoff = registration_backoff
        self._store = StateStore(settings.state_dir)
        self._outbox = Outbox(settings.buffer_size)
        self._identity: Identity | None = None
        self._sequence: Sequence | None = None
        self._connected = False
        self._connects = 0
        self._published = 0
        self._received = 0

    @property
    def device_id(self) -> str | None:
        """The device id, known once the key is loaded."""
        return self._identity.device_id if self._identity else None

    @property
    def stats(self) -> AgentStats:
        """Current counters."""
        return AgentStats(
            device_id=self.device_id,
            connected=self._connected,
            connects=self._connects,
            published=self._published,
            buffered=len(self._outbox),
            dropped=self._outbox.dropped,
            received=self._received,
            last_seq=self._sequence.last if self._sequence else None,
        )

    async def run(self) -> None:
        """Register, then heartbeat and stay connected until cancelled.

        Raises an AgentError subclass when the device cannot run at all (unusable key or state,
        registration refused); everything transient is retried forever.
        """
        identity = await asyncio.to_thread(load_or_create, self.settings.state_dir, self.settings.key_type)
        self._identity = identity
        with structlog.contextvars.bound_contextvars(device_id=identity.device_id):
            await self._store.load()
            registration = await self._ensure_registered(identity)
            self._sequence = Sequence(self._store)
            topics = Topics(registration.mqtt.topic_prefix)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._heartbeats(identity, topics, self._sequence), name="heartbeats")
                tasks.create_task(self._stay_connected(identity, topics, registration), name="mqtt")

    async def _ensure_registered(self, identity: Identity) -> RegistrationResponse:
        stored = self._store.state.registration
        if (
            stored is not None
            and stored.device_id == identity.device_id
            and stored.status == "active"
            and stored.certificate
        ):
            # The certificate is what the broker checks; the API need not be reachable to run.
            log.info("using stored registration", mqtt_host=stored.mqtt.host, mqtt_port=stored.mqtt.port)
            return stored
        if self._http is not None:
            registration = await self._register(self._http, identity)
        else:
            async with httpx.AsyncClient(timeout=self.settings.api_timeout_s) as http:
                registration = await self._register(http, identity)
        await self._store.save_registration(registration)
        return registration

    async def _register(self, http: httpx.AsyncClient, identity: Identity) -> RegistrationResponse:
        registrar = Registrar(
            http, self.settings.api_url, name=self.settings.name, backoff=self._registration_backoff
        )
        return await registrar.register(identity)

    # --- producing -------------------------------------------------------------------------

    async def _heartbeats(self, identity: Identity, topics: Topics, sequence: Sequence) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.heartbeat_interval_s
        topic = topics.heartbeat(identity.device_id)
        next_at = loop.time()
        while True:
            self._outbox.put(await self._heartbeat(identity, topic, sequence))
            next_at += interval
            now = loop.time()
            if next_at < now:
                # Fell behind (host suspended, loop starved): skip the missed beats, no burst.
                next_at = now + interval
            await asyncio.sleep(next_at - now)

    async def _heartbeat(self, identity: Identity, topic: str, sequence: Sequence) -> OutgoingMessage:
        metrics = await self._telemetry.sample()
        state = self._store.state
        seq = await sequence.next()
        claims = {
            "device_id": identity.device_id,
            "seq": seq,
            "ts": format_ts(utc_now()),
            "status": "ok",
            "metrics": metrics.model_dump(mode="json"),
            "bundle": state.bundle.model_dump(mode="json") if state.bundle else None,
            "config_version": state.config_version,
            "agent_version": __version__,
        }
        token = jws.sign_claims(claims, identity.key, kid=identity.device_id, typ=jws.TYP_HEARTBEAT)
        return OutgoingMessage(topic=topic, payload=token.encode("ascii"), seq=seq)

    # --- the connection --------------------------------------------------------------------

    async def _stay_connected(
        self, identity: Identity, topics: Topics, registration: RegistrationResponse
    ) -> None:
        loop = asyncio.get_running_loop()
        backoff = self._reconnect_backoff
        while True:
            started = loop.time()
            try:
                await self._session(self._client(identity, topics, registration), identity, topics)
            except aiomqtt.MqttError as exc:
                # Leaving a cancelled session, aiomqtt's disconnect can fail (broker gone, DISCONNECT
                # timed out): that error must not hide the cancellation, or the agent reconnects.
                _raise_if_cancelled()
                reason = str(exc)
            else:
                reason = "connection closed"
            if loop.time() - started >= STABLE_CONNECTION_S:
                backoff.reset()
            delay = backoff.next_delay()
            log.warning(
                "broker connection lost, reconnecting",
                error=reason,
                retry_in_s=round(delay, 2),
                buffered=len(self._outbox),
            )
            await asyncio.sleep(delay)

    def _client(
        self, identity: Identity, topics: Topics, registration: RegistrationResponse
    ) -> aiomqtt.Client:
        # A fresh client per connection: a reused one keeps futures and queues from the
        # connection that died, and its TLS files may have changed since.
        return aiomqtt.Client(
            registration.mqtt.host,
            registration.mqtt.port,
            identifier=identity.device_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            # The Will's ts is when it was registered with the broker, which cannot stamp it.
            will=aiomqtt.Will(
                topics.status(identity.device_id),
                status_payload(ConnectionStatus.OFFLINE),
                qos=QOS_AT_LEAST_ONCE,
                retain=True,
            ),
            tls_params=aiomqtt.TLSParameters(
                ca_certs=str(self._store.ca_path),
                certfile=str(self._store.cert_path),
                keyfile=str(identity.key_path),
            ),
            keepalive=KEEPALIVE_S,
            timeout=MQTT_TIMEOUT_S,
        )

    async def _session(self, client: aiomqtt.Client, identity: Identity, topics: Topics) -> None:
        status_topic = topics.status(identity.device_id)
        async with client:
            _raise_if_cancelled()
            self._connected = True
            self._connects += 1
            log.info("connected to broker", buffered=len(self._outbox))
            try:
                await client.publish(
                    status_topic, status_payload(ConnectionStatus.ONLINE), qos=QOS_AT_LEAST_ONCE, retain=True
                )
                _raise_if_cancelled()
                # Commands are retained: subscribing on every connect delivers the latest of each kind.
                await client.subscribe(topics.commands_filter(identity.device_id), qos=QOS_AT_LEAST_ONCE)
                _raise_if_cancelled()
                # Both run until the connection drops, which ends them with MqttError.
                await _until_first_exits(self._drain_outbox(client), self._receive(client, topics))
            except asyncio.CancelledError:
                self._connected = False
                await self._say_offline(client, status_topic)
                raise
            finally:
                self._connected = False

    async def _say_offline(self, client: aiomqtt.Client, status_topic: str) -> None:
        try:
            await client.publish(
                status_topic,
                status_payload(ConnectionStatus.OFFLINE),
                qos=QOS_AT_LEAST_ONCE,
                retain=True,
                timeout=GOODBYE_TIMEOUT_S,
            )
        except aiomqtt.MqttError as exc:
            # The broker is already gone; it will publish the Last Will once it notices.
            log.warning("could not publish offline status on shutdown", error=str(exc))
        else:
            log.info("published offline status, disconnecting")

    async def _drain_outbox(self, client: aiomqtt.Client) -> None:
        while True:
            message = await self._outbox.get()
            try:
                await client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            except BaseException:
                # Not acknowledged: keep it (first in line) for the next connection.
                self._outbox.put_back(message)
                raise
            self._published += 1
            _raise_if_cancelled()

    async def _receive(self, client: aiomqtt.Client, topics: Topics) -> None:
        # Ends by raising MqttError when the connection drops, which ends the session.
        async for message in client.messages:
            self._received += 1
            self._on_message(message, topics)

    def _on_message(self, message: aiomqtt.Message, topics: Topics) -> None:
        """The command extension point: verifying and executing commands hooks in here."""
        topic = message.topic.value
        try:
            parsed = topics.parse(topic)
        except TopicError as exc:
            log.warning("message on an unexpected topic ignored", topic=topic, error=str(exc))
            return
        payload = message.payload
        log.debug(
            "command received",
            topic=topic,
            kind=parsed.command_kind.value if parsed.command_kind else None,
            retained=message.retain,
            size=len(payload) if isinstance(payload, bytes | bytearray | str) else None,
        )


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that Python 3.11's `asyncio.wait_for` (inside aiomqtt) swallowed.

    On 3.11, a task cancelled while the reply it awaits arrives gets the reply and loses the
    CancelledError (CPython gh-86296, fixed in 3.12); the task's cancel count still shows it.
    Only reliable in tasks that run no TaskGroup or asyncio.timeout, which uncancel; hence
    `_until_first_exits` instead of a TaskGroup in the connection task.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _until_first_exits(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run the coroutines as tasks until one ends, then cancel the others; re-raise its error.

    Not a TaskGroup: on 3.11, a TaskGroup whose child fails while it waits in __aexit__ leaves the
    parent's cancel count raised for good, which `_raise_if_cancelled` would mistake for a stop.
    """
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        # Let each finish its cleanup (the publisher puts its in-flight message back).
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
