"""The API's own MQTT connection: readiness today, publishing signed commands later."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt

from kernex.kit.backoff import Backoff
from kernex.kit.logs import get_logger

log = get_logger(__name__)

KEEPALIVE_S = 30  # short enough that /readyz notices a dead broker within a minute
CONNECT_TIMEOUT_S = 10


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
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        """True while the connection is up."""
        return self._connected.is_set()

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
            )
            try:
                async with client:
                    self._connected.set()
                    self.last_error = None
                    backoff.reset()
                    log.info("broker connected", host=self._host, port=self._port)
                    # Nothing to consume yet: wait until the connection drops (raises MqttError).
                    async for _ in client.messages:
                        pass
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
            finally:
                self._connected.clear()
            delay = backoff.next_delay()
            log.warning("broker connection lost; retrying", error=self.last_error, retry_in_s=round(delay, 1))
            await asyncio.sleep(delay)
