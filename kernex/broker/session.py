"""Cut a client's live MQTT session: how a revoked device is disconnected at once.

Mosquitto 2.0.11 re-reads its CRL on SIGHUP but only checks it at the next TLS handshake: a
revoked device that is connected stays connected. MQTT's session takeover closes it: a new
connection with the same client id makes the broker disconnect the old one (MQTT 5 §3.1.4,
reason 0x8E "Session taken over"). The platform connects under its own service identity (the
ACL confines what it may do, not which client id it uses), with a clean start and no session
expiry, so the device's queued session is discarded too, then disconnects. The device's
reconnect then fails the handshake against the reloaded CRL.

Blocking (paho's synchronous connect): call it from a thread.
"""

from __future__ import annotations

import ssl
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from kernex.broker.exceptions import BrokerError

CUT_TIMEOUT_S = 10.0  # a TLS handshake and a CONNACK on a healthy broker take milliseconds
KEEPALIVE_S = 30  # the connection lives for one round trip; any legal value will do


class SessionCutError(BrokerError):
    """The broker could not be reached, or refused the takeover connection."""


def cut_session(
    *, host: str, port: int, ssl_context: ssl.SSLContext, client_id: str, timeout_s: float = CUT_TIMEOUT_S
) -> None:
    """Disconnect whichever client holds client_id on the broker (and drop its session)."""
    connected = threading.Event()
    outcome: list[ReasonCode] = []

    def on_connect(
        _client: mqtt.Client, _userdata: object, _flags: object, reason: ReasonCode, _properties: object
    ) -> None:
        outcome.append(reason)
        connected.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.on_connect = on_connect
    client.tls_set_context(ssl_context)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
    properties.SessionExpiryInterval = 0
    try:
        client.connect(host, port, keepalive=KEEPALIVE_S, clean_start=True, properties=properties)
    except OSError as exc:
        raise SessionCutError(f"cannot reach the broker at {host}:{port}: {exc}") from None
    client.loop_start()
    try:
        if not connected.wait(timeout_s):
            raise SessionCutError(f"no CONNACK from {host}:{port} within {timeout_s} s")
        if outcome[0].is_failure:
            raise SessionCutError(f"the broker refused the takeover connection: {outcome[0]}")
    finally:
        client.disconnect()
        client.loop_stop()
