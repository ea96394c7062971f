"""The API's own MQTT connection: readiness, and publishing (and clearing) retained signed commands."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt

from kernex.api.errors import ServiceUnavailableError
from kernex.kit.backoff import Backoff
from kernex.kit.logs import get_logger

log = get_logger(__name__)

KEEPALIVE_S = 30  # short enough that /readyz notices a dead broker within a minute
CONNECT_TIMEOUT_S = 10
# A QoS 1 PUBACK on a healthy broker takes milliseconds; past this the link is as good as down,
# and the command stays pending for the republisher.
PUBLISH_TIMEOUT_S = 10
# QoS 1 publishes awaiting their PUBACK at once (paho's default is 20): a deployment's commands
# go out back to back instead of 20 per round trip. The broker may lower it (Receive Maximum).
MAX_INFLIGHT = 256


class BrokerUnavailableError(ServiceUnavailableError):
    """The API is not connected to the broker, or the broker did not acknowledge a publish."""

    code = "broker_unavailable"


class BrokerLink:
    """Keeps one mTLS MQTT v5 connection to the broker open, reconnecting with backoff."""

    def __init__(
        self, *, host: str, port: int, ca_cert: Path, cert: Path, key: Path, client_id: str = "kernex-api"
    ) -> None:
        self._host = host
        self._port = port
        self._tls = aiomqtt.TLSParameters(ca_certs=str(ca_cert), certfile=str(cert), keyfile=str(key))
        self._client_id = client_id
        self._connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self.last_error: str | None = None
        self.connects = (
            0  # connections made so far: a new one may face a broker that forgot retained messages
        )

    @property
    def connected(self) -> bool:
        """True while the connection is up."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Return once the connection is up (at once if it is)."""
        await self._connected.wait()

    async def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1) -> None:
        """Publish and, for QoS 1, wait for the broker's acknowledgement.

        An empty retained payload deletes the topic's retained message (MQTT 5 §3.3.1.3).
        Raises BrokerUnavailableError when disconnected or when the broker does not answer.
        """
        client = self._client
        if client is None or not self.connected:
            raise BrokerUnavailableError(f"not connected to the broker ({self.last_error or 'connecting'})")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=PUBLISH_TIMEOUT_S)
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailableError(f"publish to the broker failed: {exc}") from None

    async def run(self) -> None:
        """Connect and stay connected until cancelled."""
        backoff = Backoff(initial_s=1, max_s=30)
        while True:
            client = aiomqtt.Client(
                self._host,
                self._port,
                identifier=self._client_id,
                protocol=aiomqtt.ProtocolVersion.V5,
                tls_params=self._tls,
                keepalive=KEEPALIVE_S,
                timeout=CONNECT_TIMEOUT_S,
                max_inflight_messages=MAX_INFLIGHT,
            )
            # aiomqtt warns (one line per publish) past 10 waiting publishes; the command
            # publisher keeps up to MAX_INFLIGHT waiting by design, so only more is worth a line.
            client.pending_calls_threshold = 2 * MAX_INFLIGHT
            try:
                async with client:
                    self._client = client
                    self.connects += 1
                    self._connected.set()
                    self.last_error = None
                    backoff.reset()
                    log.info("broker connected", host=self._host, port=self._port)
                    # Nothing to consume: wait until the connection drops (raises MqttError).
                    async for _ in client.messages:
                        pass
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
            finally:
                self._connected.clear()
                self._client = None
            delay = backoff.next_delay()
            log.warning("broker connection lost; retrying", error=self.last_error, retry_in_s=round(delay, 1))
            await asyncio.sleep(delay)
