"""The device agent: register, hold a mutual-TLS MQTT v5 session, publish signed heartbeats,
obey signed commands.

Heartbeats are produced on a schedule (the configured interval, changed live by config commands)
into the outbox whether or not the broker is reachable; one publisher per connection drains the
outbox in order. The connection loop reconnects forever with backoff, announcing "online"
(retained) on every connect and leaving "offline" as its Last Will; a clean shutdown publishes
"offline" itself, because the broker sends the Will only when a client vanishes.

Commands (retained on `commands/{kind}`, or in the answer of the HTTP fallback) are handed to
kernex.agent.commands, which verifies them and runs them at most once: deploys in the background
(kernex.agent.deploy), configuration live (kernex.agent.config). Their reports are signed events
in the same outbox. When MQTT stays unreachable for `fallback_after_s`, kernex.agent.fallback
sends the outbox over HTTPS until the broker is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import aiomqtt
import httpx
import structlog

from kernex import __version__
from kernex.agent.bundles import BundleInstaller, Progress
from kernex.agent.commands import CommandHandler, Source, initial_keys, pinned_command_keys
from kernex.agent.config import Configurator, LiveSettings
from kernex.agent.deploy import Deployer
from kernex.agent.events import EventPublisher
from kernex.agent.fallback import HttpFallback, MqttLink
from kernex.agent.identity import Identity, load_or_create
from kernex.agent.outbox import Outbox, OutgoingMessage
from kernex.agent.registration import Registrar
from kernex.agent.renewal import Renewer
from kernex.agent.sequence import Sequence
from kernex.agent.settings import AgentSettings
from kernex.agent.state import StateStore
from kernex.agent.telemetry import Telemetry
from kernex.agent.wakeup import Wakeup
from kernex.kit import logs
from kernex.kit.backoff import Backoff
from kernex.kit.logs import get_logger
from kernex.protocol import jws
from kernex.protocol.exceptions import TopicError
from kernex.protocol.keys import PublicKey
from kernex.protocol.messages import CommandKey, ConnectionStatus, RegistrationResponse, format_ts, utc_now
from kernex.protocol.topics import Channel, Topics
from kernex.protocol.version import PROTOCOL_VERSION

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
    commands_executed: int = 0  # config commands applied and deploy commands taken up
    commands_refused: int = 0
    deploys_executed: int = 0
    fallback_active: bool = False
    sent_over_http: int = 0


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
        fallback_backoff: Backoff | None = None,
        set_log_level: Callable[[str], None] = logs.set_level,
    ) -> None:
        """`http` and `telemetry` may be shared between agents (the simulator runs thousands).

        `set_log_level` applies a log level a config command sets (the process's, by default).
        """
        self.settings = settings
        self._http = http
        self._telemetry = telemetry or Telemetry(settings.state_dir)
        self._reconnect_backoff = reconnect_backoff or Backoff(
            initial_s=RECONNECT_INITIAL_S, max_s=RECONNECT_MAX_S
        )
        self._registration_backoff = registration_backoff
        self._fallback_backoff = fallback_backoff
        self._store = StateStore(settings.state_dir)
        # Rung on every queued message and connection change: the HTTP fallback's cue.
        self._fallback_wakeup = Wakeup()
        self._outbox = Outbox(settings.buffer_size, on_put=self._fallback_wakeup.ring)
        # Whoever sends from the outbox (MQTT publisher or HTTP fallback) holds this: one at a time.
        self._send_lock = asyncio.Lock()
        self._link = MqttLink()
        self.live = LiveSettings(settings, set_log_level=set_log_level)
        self._identity: Identity | None = None
        self._sequence: Sequence | None = None
        self._commands: CommandHandler | None = None
        self._deployer: Deployer | None = None
        self._fallback: HttpFallback | None = None
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
            commands_executed=self._commands.executed if self._commands else 0,
            commands_refused=sum(self._commands.refused.values()) if self._commands else 0,
            deploys_executed=self._deployer.executed if self._deployer else 0,
            fallback_active=self._fallback.active if self._fallback else False,
            sent_over_http=self._fallback.sent if self._fallback else 0,
        )

    @property
    def deployer(self) -> Deployer | None:
        """The deploy command runner, once the agent runs (its installer, for tests and tools)."""
        return self._deployer

    async def run(self) -> None:
        """Register, then heartbeat and stay connected until cancelled.

        Raises an AgentError subclass when the device cannot run at all (unusable key or state,
        registration refused); everything transient is retried forever.
        """
        identity = await asyncio.to_thread(load_or_create, self.settings.state_dir, self.settings.key_type)
        self._identity = identity
        with structlog.contextvars.bound_contextvars(device_id=identity.device_id):
            await self._store.load()
            async with contextlib.AsyncExitStack() as stack:
                http = self._http
                if http is None:
                    http = await stack.enter_async_context(
                        httpx.AsyncClient(timeout=self.settings.api_timeout_s)
                    )
                registration = await self._ensure_registered(identity, http)
                await self._run_registered(identity, registration, http)

    async def _run_registered(
        self, identity: Identity, registration: RegistrationResponse, http: httpx.AsyncClient
    ) -> None:
        self._sequence = sequence = Sequence(self._store)
        topics = Topics(registration.mqtt.topic_prefix)
        events = EventPublisher(identity, topics.events(identity.device_id), sequence, self._outbox)
        configurator = Configurator(self._store, self.live, events)
        # Before the first heartbeat: it runs at the configured interval and says the config version.
        configurator.restore()

        def installer_for(progress: Progress) -> BundleInstaller:
            return BundleInstaller.for_agent(self.settings, identity, registration, http, progress=progress)

        self._deployer = Deployer(self._store, installer_for, events, self.live)
        keys = initial_keys(registration, self._store.state.command_keys)
        self._commands = commands = CommandHandler(
            device_id=identity.device_id,
            pinned=_pinned_keys(keys.keys),
            key_set_version=keys.version,
            store=self._store,
            deployer=self._deployer,
            configurator=configurator,
        )
        self._link.down_since = asyncio.get_running_loop().time()
        self._fallback = HttpFallback(
            http=http,
            api_url=self.settings.api_url,
            identity=identity,
            outbox=self._outbox,
            link=self._link,
            send_lock=self._send_lock,
            commands=commands,
            live=self.live,
            after_s=self.settings.fallback_after_s,
            heartbeat_topic=topics.heartbeat(identity.device_id),
            events_topic=topics.events(identity.device_id),
            wakeup=self._fallback_wakeup,
            backoff=self._fallback_backoff,
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._heartbeats(identity, topics, sequence), name="heartbeats")
            tasks.create_task(self._stay_connected(identity, topics, registration, commands), name="mqtt")
            tasks.create_task(commands.run(), name="commands")
            tasks.create_task(self._renewer(http, identity).run(), name="certificate-renewal")
            if self.settings.fallback_after_s > 0:
                tasks.create_task(self._fallback.run(), name="http-fallback")

    async def _ensure_registered(
        self, identity: Identity, http: httpx.AsyncClient | None = None
    ) -> RegistrationResponse:
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
        if http is not None:
            registration = await self._register(http, identity)
        else:
            async with httpx.AsyncClient(timeout=self.settings.api_timeout_s) as own:
                registration = await self._register(own, identity)
        await self._store.save_registration(registration)
        return registration

    def _renewer(self, http: httpx.AsyncClient, identity: Identity) -> Renewer:
        return Renewer(
            http, self.settings.api_url, identity, self._store, fraction=self.settings.renew_before_fraction
        )

    async def _register(self, http: httpx.AsyncClient, identity: Identity) -> RegistrationResponse:
        token = self.settings.enrollment_token
        registrar = Registrar(
            http,
            self.settings.api_url,
            name=self.settings.name,
            enrollment_token=token.get_secret_value() if token is not None else None,
            device_type=self.settings.device_type,
            backoff=self._registration_backoff,
        )
        return await registrar.register(identity)

    # --- producing -------------------------------------------------------------------------

    async def _heartbeats(self, identity: Identity, topics: Topics, sequence: Sequence) -> None:
        loop = asyncio.get_running_loop()
        live = self.live
        topic = topics.heartbeat(identity.device_id)
        next_at = loop.time()
        while True:
            self._outbox.put(await self._heartbeat(identity, topic, sequence))
            beat_at = next_at
            next_at = beat_at + live.heartbeat_interval_s
            now = loop.time()
            if next_at < now:
                # Fell behind (host suspended, loop starved): skip the missed beats, no burst.
                next_at = now + live.heartbeat_interval_s
            while (delay := next_at - loop.time()) > 0:
                if await live.interval_changed.wait(delay):
                    # A config command changed the interval: it counts from the last beat, so
                    # a shorter one may be due at once.
                    next_at = beat_at + live.heartbeat_interval_s

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
            "v": PROTOCOL_VERSION,
        }
        token = jws.sign_claims(claims, identity.key, kid=identity.device_id, typ=jws.TYP_HEARTBEAT)
        return OutgoingMessage(topic=topic, payload=token.encode("ascii"), seq=seq)

    # --- the connection --------------------------------------------------------------------

    async def _stay_connected(
        self, identity: Identity, topics: Topics, registration: RegistrationResponse, commands: CommandHandler
    ) -> None:
        loop = asyncio.get_running_loop()
        backoff = self._reconnect_backoff
        while True:
            started = loop.time()
            try:
                await self._session(self._client(identity, topics, registration), identity, topics, commands)
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

    async def _session(
        self, client: aiomqtt.Client, identity: Identity, topics: Topics, commands: CommandHandler
    ) -> None:
        status_topic = topics.status(identity.device_id)
        async with client:
            _raise_if_cancelled()
            self._set_connected(connected=True)
            self._connects += 1
            log.info("connected to broker", buffered=len(self._outbox))
            try:
                await client.publish(
                    status_topic, status_payload(ConnectionStatus.ONLINE), qos=QOS_AT_LEAST_ONCE, retain=True
                )
                _raise_if_cancelled()
                # Commands are retained: subscribing on every connect delivers the latest of each kind,
                # and the fleet's current command key set.
                await client.subscribe(
                    [
                        (topics.commands_filter(identity.device_id), QOS_AT_LEAST_ONCE),
                        (topics.command_keys(), QOS_AT_LEAST_ONCE),
                    ]
                )
                _raise_if_cancelled()
                # Both run until the connection drops, which ends them with MqttError.
                await _until_first_exits(
                    self._drain_outbox(client), self._receive(client, topics, identity.device_id, commands)
                )
            except asyncio.CancelledError:
                self._set_connected(connected=False)
                await self._say_offline(client, status_topic)
                raise
            finally:
                self._set_connected(connected=False)

    def _set_connected(self, *, connected: bool) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        self._link.connected = connected
        if not connected:
            self._link.down_since = asyncio.get_running_loop().time()
        self._fallback_wakeup.ring()

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
            # Held from taking a message to its PUBACK: the HTTP fallback, finishing a request
            # as the broker comes back, never sends out of turn.
            async with self._send_lock:
                message = await self._outbox.get()
                try:
                    await client.publish(
                        message.topic, message.payload, qos=message.qos, retain=message.retain
                    )
                except BaseException:
                    # Not acknowledged: keep it (first in line) for the next connection.
                    self._outbox.put_back(message)
                    raise
                self._published += 1
                message.delivered()
            _raise_if_cancelled()

    async def _receive(
        self, client: aiomqtt.Client, topics: Topics, device_id: str, commands: CommandHandler
    ) -> None:
        # Ends by raising MqttError when the connection drops, which ends the session.
        async for message in client.messages:
            self._received += 1
            self._on_message(message, topics, device_id, commands)

    def _on_message(
        self, message: aiomqtt.Message, topics: Topics, device_id: str, commands: CommandHandler
    ) -> None:
        """Hand a command or key set to the command handler (which verifies it in its own task)."""
        topic = message.topic.value
        if topic == topics.command_keys():
            commands.submit_key_set(_payload_bytes(message.payload), Source.MQTT)
            return
        try:
            parsed = topics.parse(topic)
        except TopicError as exc:
            log.warning("message on an unexpected topic ignored", topic=topic, error=str(exc))
            return
        if parsed.channel is not Channel.COMMANDS or parsed.device_id != device_id:
            log.warning("message on an unexpected topic ignored", topic=topic)
            return
        payload = _payload_bytes(message.payload)
        log.debug(
            "command received",
            topic=topic,
            kind=parsed.command_kind.value if parsed.command_kind else None,
            retained=message.retain,
            size=len(payload),
        )
        commands.submit(parsed.command_kind, payload, Source.MQTT)


def _payload_bytes(payload: object) -> bytes:
    """aiomqtt types payloads loosely; on the wire they are bytes (empty: a cleared retained message)."""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return b"" if payload is None else str(payload).encode("utf-8")


def _pinned_keys(keys: list[CommandKey]) -> Mapping[str, PublicKey]:
    pinned = pinned_command_keys(keys)
    if not pinned:
        log.warning("no control-plane key pinned: every command will be refused")
    return pinned


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
